"""Tools over rewritten graphs: inspect and drawings, the memory planner, generation, serving,
FSDP2, the command line and the demo. The top layer: it may import everything below it."""
