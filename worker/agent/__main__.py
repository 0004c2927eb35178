"""``python -m toolq.worker.agent``: run the agent from the installed package."""

from .loop import main

main()
