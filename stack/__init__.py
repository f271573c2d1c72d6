"""The guest side: the kernel model, the drivers and the agent; `stack.vcpu` is the agent's CPU."""
