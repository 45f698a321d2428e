"""``headrace demo``: the whole path end to end on a fresh machine.

Redis (``HEADRACE_REDIS_URL`` or a private embedded server) → MiniLM built into the model
repository if absent → the serving side (:func:`start_serving`) → real sentences through the
SDK (``Client.map``) → similarities → the status table → clean shutdown.

:func:`start_serving` is the one place that decides *how* the model is served (today:
standalone workers in threads of this process); switching the demo to Ray Serve means
changing that function only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

log = logging.getLogger(__name__)

DEMO_MODEL = "minilm"

# Everyday sentences in eight topics, six each: similar meaning within a topic, different
# across topics, so the printed similarities show whether the served model works.
DEMO_SENTENCES: tuple[tuple[str, str], ...] = tuple(
    (topic, s) for topic, group in (
        ("weather", ("It is going to rain all afternoon, so take an umbrella.",
                     "The forecast says heavy showers later today.",
                     "Dark clouds are gathering and the wind is picking up.",
                     "We had a week of sunshine and clear blue skies.",
                     "Snow is expected overnight in the mountains.",
                     "The storm knocked down several trees in the park.")),
        ("cooking", ("Simmer the tomato sauce for twenty minutes before adding the basil.",
                     "Preheat the oven and bake the bread until it is golden brown.",
                     "Chop the onions finely and fry them in olive oil.",
                     "This soup tastes better the day after you make it.",
                     "Whisk the eggs with a little milk for fluffier omelettes.",
                     "She seasoned the roast chicken with garlic and rosemary.")),
        ("football", ("The striker scored twice in the second half.",
                      "Our team won the match three goals to one.",
                      "The goalkeeper saved a penalty in the last minute.",
                      "The referee showed him a red card for a reckless tackle.",
                      "Fans filled the stadium for the cup final.",
                      "The coach changed tactics after a poor first half.")),
        ("finance", ("The central bank raised interest rates again this quarter.",
                     "Stock markets fell sharply after the earnings report.",
                     "Inflation is eating into household savings.",
                     "The company's shares rose ten percent on the news.",
                     "Mortgage payments have gone up for many families.",
                     "Investors are moving money into government bonds.")),
        ("health", ("Regular exercise lowers the risk of heart disease.",
                    "The doctor told him to get more sleep and drink water.",
                    "A balanced diet with vegetables keeps you healthy.",
                    "She went to the hospital with a high fever.",
                    "Washing your hands helps stop the flu from spreading.",
                    "Walking thirty minutes a day improves your mood.")),
        ("travel", ("Our flight to Lisbon was delayed by two hours.",
                    "We booked a small hotel near the old town.",
                    "The train across the Alps has spectacular views.",
                    "Don't forget your passport when you go abroad.",
                    "They spent the summer backpacking through Vietnam.",
                    "The airport was crowded at the start of the holidays.")),
        ("computers", ("My laptop keeps crashing after the latest update.",
                       "The database query is slow because it lacks an index.",
                       "He restarted the server to free up memory.",
                       "Back up your files before reinstalling the operating system.",
                       "The program crashed with an out of memory error.",
                       "Our website went down when traffic spiked.")),
        ("animals", ("The cat slept on the windowsill all afternoon.",
                     "Our dog barks whenever the doorbell rings.",
                     "A family of ducks crossed the road to the pond.",
                     "The puppy chewed one of my shoes.",
                     "Horses grazed quietly in the field behind the farm.",
                     "Birds were singing in the garden at sunrise.")),
    )
    for s in group
)


@dataclass
class ServingHandle:
    """What :func:`start_serving` started; :meth:`stop` drains and releases it."""

    description: str
    _stop: Callable[[], None] = field(repr=False)
    stopped: bool = False

    def stop(self) -> None:
        """Stop serving (graceful drain). Idempotent."""
        if not self.stopped:
            self.stopped = True
            self._stop()


def start_serving(settings: Any, n_workers: int = 1) -> ServingHandle:
    """Start serving ``settings.model`` with ``n_workers`` Ray Serve replicas on a local Ray
    instance (:func:`headrace.cluster.ops.lifecycle.serve_locally`); if Ray cannot start or deploy here,
    fall back to ``n_workers`` standalone workers (one
    :class:`~headrace.workers.engine.worker.WorkerThread` each, in this process).

    Args:
        settings: :class:`~headrace.workers.settings.WorkerSettings` (consumer names are
            made unique per worker).

    Raises:
        ModelNotFoundError: the model is not in the repository.
        ModelError: it failed to load.
    """
    try:
        from headrace.cluster.ops.lifecycle import serve_locally

        description, stop_ray = serve_locally(settings, n_workers)
        return ServingHandle(description=description, _stop=stop_ray)
    except Exception as e:  # noqa: BLE001 - any Ray start/deploy failure falls back to threads
        log.warning("Ray Serve could not serve the demo (%s); falling back to standalone worker threads", e)

    from headrace.workers.backends import load_servable
    from headrace.workers.engine.thread import WorkerThread
    from headrace.workers.settings import default_consumer_name

    threads: list[Any] = []
    servables: list[Any] = []

    def stop() -> None:
        for t in threads:
            try:
                t.stop(drain=True, timeout_s=settings.drain_timeout_s)
            except Exception:  # noqa: BLE001 - stop every worker even if one fails
                log.exception("stopping a demo worker failed")
        for s in servables:
            s.close()

    try:
        for _ in range(n_workers):
            ws = settings.replace(consumer=settings.consumer or default_consumer_name())
            servable = load_servable(ws)
            servables.append(servable)
            t = WorkerThread(ws, servable)
            t.start()
            threads.append(t)
    except BaseException:
        stop()
        raise
    return ServingHandle(description=f"{n_workers} standalone worker thread(s) for {settings.model!r}", _stop=stop)


def pick_sentences(n: int) -> list[tuple[str, str]]:
    """``n`` demo sentences (at most all of them), round-robin over topics."""
    by_topic: dict[str, list[str]] = {}
    for topic, s in DEMO_SENTENCES:
        by_topic.setdefault(topic, []).append(s)
    out: list[tuple[str, str]] = []
    for i in range(max(len(v) for v in by_topic.values())):
        for topic, group in by_topic.items():
            if i < len(group):
                out.append((topic, group[i]))
    return out[:max(1, n)]


@dataclass(frozen=True)
class DemoReport:
    """What the demo measured (returned for tests and scripts)."""

    n: int
    wall_s: float
    within_topic_cos: float
    across_topic_cos: float
    neighbour_same_topic: float
    mean_queue_ms: float
    mean_infer_ms: float
    mean_batch: float


def similarity_report(topics: Sequence[str], emb: np.ndarray[Any, Any]) -> tuple[float, float, float, np.ndarray[Any, Any]]:
    """(mean within-topic cosine, mean across-topic cosine, share of sentences whose
    nearest neighbour is in the same topic, the cosine matrix) of row-wise embeddings."""
    e = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    sim = e @ e.T
    t = np.asarray(topics)
    same = t[:, None] == t[None, :]
    off = ~np.eye(len(t), dtype=bool)
    within = float(sim[same & off].mean()) if (same & off).any() else float("nan")
    across = float(sim[~same].mean()) if (~same).any() else float("nan")
    masked = np.where(off, sim, -np.inf)
    nn = masked.argmax(axis=1)
    hit = float((t[nn] == t).mean())
    return within, across, hit, sim


def run_demo(*, redis_url: str | None = None, namespace: str | None = None, repo: str = "model_repo",
             n_sentences: int = 48, n_workers: int = 1, progress: bool = True,
             console: Console | None = None) -> DemoReport:
    """Run the demo end to end and print as it goes.

    Raises:
        BrokerError: the given Redis is unreachable, or no redis-server can be started.
        ModelError: MiniLM could not be built or loaded.
        ResultTimeout: the worker did not answer.
    """
    from headrace.client import Client
    from headrace.client.config import ClientSettings
    from headrace.cluster.cli.render import status_table
    from headrace.cluster.cli.status_data import collect_status
    from headrace.cluster.ops.embedded_redis import EmbeddedRedis
    from headrace.workers.settings import WorkerSettings

    con = console or Console()
    settings = ClientSettings.from_env(redis_url=redis_url, namespace=namespace, timeout_s=300.0)
    embedded: EmbeddedRedis | None = None
    serving: ServingHandle | None = None
    try:
        if settings.redis_url:
            con.print(f"[bold]1/5 Redis[/]: using {settings.redis_url.split('@')[-1]}")
        else:
            embedded = EmbeddedRedis().start()
            settings = settings.replace(redis_url=embedded.url)
            con.print(f"[bold]1/5 Redis[/]: started a private redis-server at {embedded.url}")
        with Client(settings=settings) as client:
            client.ping()
            con.print(f"[bold]2/5 Model[/]: making sure {DEMO_MODEL!r} is in the repository {repo} …")
            from headrace.models.builtin.build import ensure_minilm

            t0 = time.perf_counter()
            manifest = ensure_minilm(repo)
            con.print(f"    {DEMO_MODEL} v{getattr(manifest, 'version', '?')} "
                      f"({getattr(manifest, 'format', '?')}, {getattr(manifest, 'precision', '?')}) "
                      f"ready in {time.perf_counter() - t0:.1f}s")
            wsettings = WorkerSettings.from_env(model=DEMO_MODEL, redis_url=settings.effective_redis_url,
                                                namespace=settings.namespace, model_repo=str(repo))
            serving = start_serving(wsettings, n_workers)
            con.print(f"[bold]3/5 Serving[/]: {serving.description}")

            report = _embed_and_report(client, con, n_sentences, progress)
            con.print("[bold]5/5 Status[/]:")
            import redis

            with redis.Redis.from_url(settings.effective_redis_url) as r:
                con.print(status_table(collect_status(r, settings.namespace, [DEMO_MODEL], 60.0),
                                       settings.namespace))
        return report
    finally:
        if serving is not None:
            serving.stop()
        if embedded is not None:
            embedded.close()


def _embed_and_report(client: Any, con: Console, n_sentences: int, progress: bool) -> DemoReport:
    """Step 4: embed the demo sentences through ``Client.map`` and print what they show."""
    picked = pick_sentences(n_sentences)
    topics = [t for t, _ in picked]
    texts = [s for _, s in picked]
    con.print(f"[bold]4/5 Inference[/]: {len(texts)} sentences through Client.map …")
    t0 = time.perf_counter()
    results = client.map(DEMO_MODEL, texts, progress=progress, raise_on_error=True)
    wall = time.perf_counter() - t0
    name = "embeddings" if "embeddings" in results[0].outputs else next(iter(results[0].outputs))
    emb = np.stack([np.asarray(r.outputs[name], dtype=np.float32).reshape(-1) for r in results])
    within, across, hit, sim = similarity_report(topics, emb)
    report = DemoReport(
        n=len(texts), wall_s=wall, within_topic_cos=within, across_topic_cos=across,
        neighbour_same_topic=hit,
        mean_queue_ms=float(np.mean([r.timings.queue_ms for r in results])),
        mean_infer_ms=float(np.mean([r.timings.infer_ms for r in results])),
        mean_batch=float(np.mean([r.timings.batch_size for r in results])))
    con.print(_neighbours_table(texts, topics, sim))
    con.print(f"    {len(texts)} embeddings of {emb.shape[1]} dims in {wall:.2f}s "
              f"({len(texts) / wall:.1f} req/s incl. warm-up); mean queue {report.mean_queue_ms:.1f} ms, "
              f"infer {report.mean_infer_ms:.1f} ms per batch, mean batch {report.mean_batch:.1f}")
    con.print(f"    mean cosine within a topic {within:.3f} vs across topics {across:.3f}; "
              f"nearest neighbour in the same topic for {hit:.0%} of sentences")
    return report


def _neighbours_table(texts: Sequence[str], topics: Sequence[str], sim: np.ndarray[Any, Any],
                      rows: int = 8) -> Table:
    """The nearest other sentence for the first sentence of each topic."""
    table = Table(title="nearest neighbours (cosine of MiniLM embeddings)")
    table.add_column("sentence", overflow="fold")
    table.add_column("most similar other sentence", overflow="fold")
    table.add_column("cosine", justify="right")
    seen: set[str] = set()
    for i, topic in enumerate(topics):
        if topic in seen or len(seen) >= rows:
            continue
        seen.add(topic)
        row = sim[i].copy()
        row[i] = -np.inf
        j = int(row.argmax())
        table.add_row(texts[i], texts[j], f"{sim[i, j]:.3f}")
    return table
