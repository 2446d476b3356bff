"""Where the flows were before the package had layers: deployments made with the entrypoint
`prefect_anthropic.flows:generate_dataset` keep working."""

from .orchestration.flows import generate_dataset, generate_dataset_from_table

__all__ = ["generate_dataset", "generate_dataset_from_table"]
