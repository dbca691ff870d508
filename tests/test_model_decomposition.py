"""TaskDecomposition and ModelConfig: defaults, validation messages, JSON round trips."""

import json

import pytest

from ciml_core.errors import ConfigError
from ciml_core.model import ModelConfig, Task, TaskDecomposition


def test_brats_default_is_table6_best_row():
    d = TaskDecomposition.brats()
    assert d.modalities == ("flair", "t1", "t1ce", "t2")
    assert d.regions == ("WT", "TC", "ET")
    assert [(t.primary, t.regions) for t in d.tasks] == [
        (("flair",), ("WT",)),
        (("t1",), ("TC",)),
        (("t2",), ("WT", "TC")),
        (("t1ce",), ("TC", "ET")),
    ]
    assert [d.input_channels(i) for i in range(4)] == [[0], [1], [3], [2]]
    assert d.tasks_predicting("WT") == [0, 2]
    assert d.tasks_predicting("TC") == [1, 2, 3]
    assert d.tasks_predicting("ET") == [3]
    assert d.regions_of(3) == ("TC", "ET")
    assert d.modality_index("t2") == 3 and d.region_index("ET") == 2
    assert [t.name for t in d.tasks] == ["flair", "t1", "t2", "t1ce"]


def test_petct_default():
    d = TaskDecomposition.petct()
    assert d.modalities == ("ct", "pet") and d.regions == ("lesion",)
    assert d.tasks_predicting("lesion") == [0, 1]


def test_several_primary_modalities_and_json_round_trip():
    d = TaskDecomposition(
        tasks=[Task(["t1ce", "flair"], ["TC", "ET"]), Task(("t2",), ("WT",))],
        modalities=["flair", "t1ce", "t2"],
        regions=["WT", "TC", "ET"],
    )
    assert d.input_channels(0) == [1, 0]
    assert d.tasks[0].name == "t1ce+flair"
    text = json.dumps(d.to_dict())
    back = TaskDecomposition.from_dict(json.loads(text))
    assert back == d
    assert (
        TaskDecomposition.from_dict(TaskDecomposition.brats().to_dict())
        == TaskDecomposition.brats()
    )


def _brats_dict(**changes):
    data = TaskDecomposition.brats().to_dict()
    data.update(changes)
    return data


def _task(primary, regions):
    return {"primary": primary, "regions": regions}


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        (_brats_dict(modalities=["flair", "t1", "t2"]), ["tasks[3].primary", "'t1ce'"]),
        (
            _brats_dict(
                tasks=[_task(["flair"], ["WT", "NCR"]), _task(["t1", "t1ce", "t2"], ["TC", "ET"])]
            ),
            ["tasks[0].regions", "unknown region", "'NCR'"],
        ),
        (
            _brats_dict(tasks=[_task(["flair", "t2"], ["WT"]), _task(["t1", "t1ce"], ["TC"])]),
            ["region 'ET'", "predicted by no task"],
        ),
        (
            _brats_dict(
                tasks=[_task(["flair"], ["WT", "WT"]), _task(["t1", "t1ce", "t2"], ["TC", "ET"])]
            ),
            ["tasks[0].regions", "twice"],
        ),
        (
            _brats_dict(
                tasks=[_task(["t1", "t1"], ["WT"]), _task(["flair", "t1ce", "t2"], ["TC", "ET"])]
            ),
            ["tasks[0].primary", "twice"],
        ),
        (
            _brats_dict(
                tasks=[
                    _task(["flair"], ["WT"]),
                    _task(["flair"], ["TC"]),
                    _task(["t1", "t1ce", "t2"], ["ET"]),
                ]
            ),
            ["tasks (by primary modalities)", "'flair'", "twice"],
        ),
        (_brats_dict(tasks=[]), ["tasks is empty"]),
        (_brats_dict(modalities=[]), ["modalities is empty"]),
        (_brats_dict(regions=["WT", "TC", "ET", "TC"]), ["regions lists 'TC' twice"]),
        (_brats_dict(tasks=[_task([], ["WT", "TC", "ET"])]), ["tasks[0].primary is empty"]),
        (_brats_dict(modalities=["FLAIR", "t1", "t1ce", "t2"]), ["'FLAIR'", "lower case"]),
        (_brats_dict(tasks=[{"primary": ["flair"]}]), ["tasks[0]", "'regions'"]),
        ({"modalities": ["ct"], "tasks": []}, ["missing ['regions']"]),
        (_brats_dict(regions="WT"), ["regions must be a list"]),
    ],
)
def test_invalid_decompositions_name_the_field(data, fragments):
    with pytest.raises(ConfigError) as info:
        TaskDecomposition.from_dict(data)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_lookup_errors():
    d = TaskDecomposition.brats()
    with pytest.raises(ConfigError, match="unknown modality 'pet'"):
        d.modality_index("pet")
    with pytest.raises(ConfigError, match="unknown region 'lesion'"):
        d.region_index("lesion")


def test_model_config_defaults_and_json_round_trip():
    config = ModelConfig()
    assert (config.width, config.norm, config.spatial_dims) == (16, "batch", 3)
    assert config.variant == "full" and config.decomposition == TaskDecomposition.brats()
    assert config.patch_size == (64, 64, 64) and config.dilation == 1
    assert not config.detach_messages
    assert ModelConfig(spatial_dims=2).patch_size == (64, 64)
    custom = ModelConfig(
        decomposition=TaskDecomposition.petct(),
        width=8,
        norm="instance",
        variant="vi",
        detach_messages=True,
        dilation=2,
        patch_size=[128, 128, 96],
    )
    data = json.loads(json.dumps(custom.to_dict()))
    assert data["decomposition"]["modalities"] == ["ct", "pet"]
    assert data["patch_size"] == [128, 128, 96]
    assert ModelConfig.from_dict(data) == custom
    assert ModelConfig.from_dict({"width": 8}) == ModelConfig(width=8)


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"width": 0}, ["ModelConfig.width", "positive integer"]),
        ({"width": True}, ["ModelConfig.width"]),
        ({"dilation": 0}, ["ModelConfig.dilation"]),
        ({"norm": "group"}, ["ModelConfig.norm", "'group'"]),
        ({"spatial_dims": 1}, ["ModelConfig.spatial_dims"]),
        ({"variant": "unet"}, ["ModelConfig.variant", "'unet'"]),
        ({"detach_messages": "yes"}, ["ModelConfig.detach_messages"]),
        ({"patch_size": (60, 64, 64)}, ["ModelConfig.patch_size", "multiple of 16", "[60]"]),
        ({"patch_size": (64, 64)}, ["ModelConfig.patch_size", "3 positive integers"]),
        ({"spatial_dims": 2, "patch_size": (48, 40)}, ["multiple of 16", "[40]"]),
        (
            {"decomposition": TaskDecomposition.shapes()},
            ["['auxiliary']", "no task's primary modality"],
        ),
        (
            {
                "decomposition": TaskDecomposition(
                    (Task(("ct",), ("lesion",)),), ("ct",), ("lesion",)
                )
            },
            ["at least 2 tasks", "'full'"],
        ),
        ({"variant": "shapecomposition"}, ["'shapecomposition' needs exactly one task"]),
    ],
)
def test_invalid_model_configs_name_the_field(kwargs, fragments):
    with pytest.raises(ConfigError) as info:
        ModelConfig(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_single_task_is_fine_for_baseline_and_dynunet():
    single = TaskDecomposition((Task(("ct",), ("lesion",)),), ("ct",), ("lesion",))
    assert ModelConfig(decomposition=single, variant="baseline").variant == "baseline"
    assert ModelConfig(decomposition=single, variant="dynunet").variant == "dynunet"


def test_model_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match=r"unknown keys \['base_width'\]"):
        ModelConfig.from_dict({"base_width": 16})
