"""Shared pytest setup: never touch the network (zoo models build from configs)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
