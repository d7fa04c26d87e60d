"""The parameter server: center variable, wire protocol, clients, checkpoints and training algorithms.

Transport (``protocol``, ``server``, ``client``) knows nothing about algorithms; an algorithm is a
worker loop plus a server-side update rule (``algorithms``). Everything here is numpy only, except
``shards``, which runs shards as processes and publishes their weights to the registry.
"""
