"""Consumer processes: listeners (Kazoo's gen_listener), their federators, the pool's own."""
