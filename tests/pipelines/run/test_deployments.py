"""Every shipped deployment names a real flow with parameters that flow accepts, and its config loads."""

from pathlib import Path

import pytest
import yaml
from prefect.flows import load_flow_from_entrypoint

from pipelines.core.config import load_config

ROOT = Path(__file__).resolve().parents[3]
PREFECT_FILES = [ROOT / "prefect.yaml", ROOT / "deploy" / "multihost.prefect.yaml"]


def deployments():
    for path in PREFECT_FILES:
        for deployment in yaml.safe_load(path.read_text())["deployments"]:
            yield pytest.param(deployment, id=f"{path.name}:{deployment['name']}")


@pytest.mark.parametrize("deployment", deployments())
def test_a_deployment_names_a_flow_and_parameters_it_accepts(deployment, monkeypatch):
    monkeypatch.chdir(ROOT)
    flow = load_flow_from_entrypoint(deployment["entrypoint"])
    flow.validate_parameters(deployment["parameters"])
    load_config(ROOT / deployment["parameters"]["config_path"])


def test_the_moda_deployments_cover_every_stage_add_expert_and_the_sweep():
    from pipelines.run.stages import NAMES

    names = {d["name"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert names == {"full", "add-expert", "sweep", *NAMES}
