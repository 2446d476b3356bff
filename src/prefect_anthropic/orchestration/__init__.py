"""The Prefect layer: the flows, their tasks, the work-pool fan-out, batch mode's tasks, the blocks, and what a
run shows in the UI (logs, events, artifacts). Thin: the steps are `dataset`'s."""
