"""A server whose expert adds pause for a minute before they commit, for the kill test:
``python tests/slow_add_server.py STORE CORPUS CACHE PORT MODEL``."""

from __future__ import annotations

import sys
import time

import uvicorn

from routerretriever import Encoder, load_corpus
from routerretriever.instances import Domain
from routerretriever.service import create_app
from routerretriever.serving import Engine

if __name__ == "__main__":
    store, corpus, cache, port, model = sys.argv[1:6]
    engine = Engine.open(
        Encoder.load(model),
        store,
        load_corpus(corpus),
        [Domain("tiny", corpus, "corpus")],
        experts=["alpha"],
        cache_dir=cache,
        routing_precision="float32",
        before_commit=lambda: time.sleep(60),
    )
    uvicorn.run(create_app(engine), host="127.0.0.1", port=int(port), log_level="warning")
