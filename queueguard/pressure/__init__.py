"""Memory pressure: sensors, the governor that turns them into a level, admission at the door, publishing it."""
