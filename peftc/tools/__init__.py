"""Tools over rewritten graphs: inspect and drawings, the memory planner, generation, serving,
FSDP2, the graph as a peft-like transformers model (`hf`: Trainer, TRL, accelerate), the command
line and the demo. The top layer: it may import everything below it."""
