import pytest

from resona_adapt import MIX_MODES, ResonaConfig, ResonaConfigError


def test_defaults_are_valid_and_function_preserving():
    cfg = ResonaConfig()
    assert cfg.mix == "residual" and cfg.function_preserving
    assert ResonaConfig(mix="gated").function_preserving
    assert not ResonaConfig(mix="paper").function_preserving
    assert not ResonaConfig(mix="paper-dynamic").function_preserving


def test_json_round_trip(tmp_path):
    cfg = ResonaConfig(chunk_size=16, top_k=3, train_top_k=6, num_heads=2, head_dim=8, search_dim=12,
                       mix="paper", alpha=0.3, lr_multiplier=50, score_scale=4)
    assert ResonaConfig.from_json(cfg.to_json()) == cfg
    cfg.save(tmp_path / "c.json")
    assert ResonaConfig.load(tmp_path / "c.json") == cfg


def test_resolved_sizes_follow_width():
    cfg = ResonaConfig().resolved(768)
    assert (cfg.num_heads, cfg.head_dim, cfg.search_dim) == (3, 64, 64)
    cfg = ResonaConfig().resolved(32)
    assert (cfg.num_heads, cfg.head_dim, cfg.search_dim) == (1, 64, 32)
    assert ResonaConfig(num_heads=5).resolved(32).num_heads == 5


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"num_heads": 0}, "num_heads"),
        ({"mix": "average"}, "mix must be one of"),
        ({"mix": "paper", "alpha": 1.0}, "alpha"),
        ({"lr_multiplier": 0}, "lr_multiplier"),
        ({"score_scale": "big"}, "score_scale"),
    ],
)
def test_bad_values_are_named(kwargs, needle):
    with pytest.raises(ResonaConfigError, match=needle):
        ResonaConfig(**kwargs)


def test_unknown_json_field_is_named():
    with pytest.raises(ResonaConfigError, match="chunksize"):
        ResonaConfig.from_json('{"chunksize": 4}')
    with pytest.raises(ResonaConfigError, match="not valid JSON"):
        ResonaConfig.from_json("{")


def test_mix_modes_listed():
    assert set(MIX_MODES) == {"residual", "gated", "paper", "paper-dynamic"}


def test_boundary_fields_defaults_and_saved_configs_without_them_keep_their_behaviour():
    from resona_adapt import ResonaConfig

    cfg = ResonaConfig()
    assert (cfg.read_shift, cfg.key_shift, cfg.neighbor_chunks) == (1, True, 0)
    new_fields = ("neighbor_chunks", "read_shift", "key_shift")
    old = {k: v for k, v in cfg.to_dict().items() if k not in new_fields}
    assert ResonaConfig.from_dict(old).read_shift == 1  # a user's file: today's defaults
    legacy = ResonaConfig.from_saved(old)  # a checkpoint written before the fields existed
    assert (legacy.read_shift, legacy.key_shift, legacy.neighbor_chunks) == (0, False, 0)
    assert ResonaConfig.from_saved(cfg.to_dict()) == cfg


@pytest.mark.parametrize("field, value", [("neighbor_chunks", -1), ("neighbor_chunks", 5), ("neighbor_chunks", True),
                                          ("key_shift", 1), ("read_shift", 2), ("read_shift", True)])
def test_boundary_fields_are_validated(field, value):
    from resona_adapt import ResonaConfig, ResonaConfigError

    with pytest.raises(ResonaConfigError, match=field):
        ResonaConfig(**{field: value})
