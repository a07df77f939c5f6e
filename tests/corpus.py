"""A small mixed corpus (Python, Markdown, plain text) with queries whose answer is known."""

from __future__ import annotations

PYTHON_HTTP = '''"""A tiny HTTP client with retries."""

import time
import urllib.request


class RetryingClient:
    """Fetches URLs, retrying failed requests with exponential backoff."""

    def __init__(self, retries: int = 3, backoff: float = 0.5) -> None:
        self.retries = retries
        self.backoff = backoff

    def fetch(self, url: str) -> bytes:
        for attempt in range(self.retries):
            try:
                with urllib.request.urlopen(url, timeout=10) as resp:
                    return resp.read()
            except OSError:
                time.sleep(self.backoff * 2 ** attempt)
        raise RuntimeError(f"giving up on {url}")
'''

PYTHON_CONFIG = '''import tomllib
from pathlib import Path


def parse_config(path: Path) -> dict:
    """Read the TOML configuration file and return its settings as a dict."""
    with path.open("rb") as fh:
        return tomllib.load(fh)


def merge_defaults(config: dict, defaults: dict) -> dict:
    merged = dict(defaults)
    merged.update(config)
    return merged
'''

MARKDOWN_BREAD = """# Baking bread at home

## Ingredients

Flour, water, salt and yeast. Use strong bread flour for a better rise.

## Method

Knead the dough for ten minutes, let it proof for two hours until doubled,
shape the loaf and bake at 230 degrees Celsius for 35 minutes.
"""

MARKDOWN_DEPLOY = """# Deploying the service

Build the container image, push it to the registry and apply the Kubernetes
manifests. The readiness probe uses the gRPC health check; scale the
Deployment with the HorizontalPodAutoscaler.
"""

TEXT_ASTRONOMY = """The Moon orbits the Earth about once every 27 days. Its gravity causes the
ocean tides. Solar eclipses happen when the Moon passes between the Sun and the Earth,
casting its shadow on our planet.
"""

TEXT_GARDEN = """Tomatoes need full sun, regular watering and well-drained soil. Pinch out
the side shoots and feed the plants with potash once the first flowers appear.
"""

CORPUS: dict[str, str] = {
    "src/http_client.py": PYTHON_HTTP,
    "src/config.py": PYTHON_CONFIG,
    "docs/bread.md": MARKDOWN_BREAD,
    "docs/deploy.md": MARKDOWN_DEPLOY,
    "notes/astronomy.txt": TEXT_ASTRONOMY,
    "notes/garden.txt": TEXT_GARDEN,
}

# query -> the document that must rank first
QUERIES: dict[str, str] = {
    "retry a failed HTTP request with exponential backoff": "src/http_client.py",
    "load settings from a TOML config file": "src/config.py",
    "how long should I knead and proof the dough": "docs/bread.md",
    "kubernetes readiness probe and autoscaling": "docs/deploy.md",
    "what causes ocean tides and solar eclipses": "notes/astronomy.txt",
    "how to grow tomato plants": "notes/garden.txt",
}
