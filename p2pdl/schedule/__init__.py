"""Group scheduling: job specs, the pure iteration-group planner, leader and worker loops."""
