"""``headrace demo`` serves through local Ray Serve (real MiniLM, end to end)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from headrace.cluster.ops.embedded_redis import EmbeddedRedis


@pytest.mark.timeout(300)
def test_demo_embeds_real_sentences_through_a_ray_serve_replica(model_repo_dir: Path) -> None:
    import ray

    from headrace.cluster.demo import run_demo

    out = io.StringIO()
    with EmbeddedRedis() as rs:
        report = run_demo(redis_url=rs.url, repo=str(model_repo_dir), n_sentences=24, n_workers=1, progress=False,
                          console=Console(file=out, width=160))
    text = out.getvalue()
    assert "Ray Serve replica(s) of 'minilm'" in text, text
    assert not ray.is_initialized(), "the demo stops its Ray instance"
    assert report.n == 24
    assert report.within_topic_cos > report.across_topic_cos + 0.1
    assert report.neighbour_same_topic >= 0.5
