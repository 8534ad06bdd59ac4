"""Which parallel layout to run: a communication-aware cost model and the planner that ranks layouts with it."""
