"""Front <-> engine process: the wire protocol (plain data), the front's client (spawn, route,
restart) and an in-thread engine for tests. Transport-free types only cross here."""
