"""interp.circuits: tasks and circuit discovery built on the hook layer (installed as interp.circuits)."""
