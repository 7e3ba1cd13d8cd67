"""Environments and policies that act in them.

    miniwob          MiniWoB++ in headless Chromium, speaking the AitW action language (MiniWoBEnv)
    page             AitW actions → MiniWoB actions in pixels, DOM elements → normalised boxes
    browser_cleanup  ending leftover Chromium/chromedriver processes, deleting temporary profiles
    view             StepView (what a policy sees, live or from a stored step) and the observation text
    policy           the Policy protocol, the registry of named policies, PolicySpec
    behavior         π_β, the stochastic DOM-grounded behaviour policy (BehaviorPolicy)
    rollout          one episode (run_episode) and its conversion to a stored Trajectory
    workers          parallel browser workers with restart, hang detection and resumable shards (run_units)

Submodules are imported on demand (selenium and gymnasium are heavy).
"""
