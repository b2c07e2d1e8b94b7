"""HardEdit pipeline: the endpoint back end against a local chat-completions server, validation, offline generator."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from editcollapse import data
from editcollapse.cli.hardedit import main
from editcollapse.hardcases.endpoint import EndpointGenerator
from editcollapse.hardcases.generate import Generation, OfflineGenerator, generations_store
from editcollapse.hardcases.pattern import FIELDS, collapse_cases, pattern, template_of
from editcollapse.hardcases.validate import CASE_ID_BASE, case_id_of, validate, yield_table

GOOD = [{"prompt": "Thunder's occupation is", "subject": "Thunder", "target_new": "architect", "ground_truth": "actor"},
        {"prompt": "Mango is a kind of", "subject": "Mango", "target_new": "vegetable", "ground_truth": "fruit"}]
ANSWERS = {  # path -> (status, message content, finish_reason, delay in s)
    "/good": (200, "Here you go:\n```json\n" + json.dumps(GOOD) + "\n```", "stop", 0),
    "/malformed": (200, '[{"prompt": "Mango is", "subject": "Mango", "target_new": "x" "ground_truth": "y"}]', "stop", 0),
    "/truncated": (200, json.dumps(GOOD)[:70], "length", 0),
    "/refusal": (200, "I'm sorry, but I can't help with generating false facts.", "stop", 0),
    "/error": (500, "internal error", None, 0),
    "/slow": (200, json.dumps(GOOD), "stop", 3.0),
    "/int": (200, 7, "stop", 0),
}


class ChatServer(BaseHTTPRequestHandler):
    """POST <mode>/chat/completions answers ANSWERS[mode]; every request body is kept in `seen`."""

    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ChatServer.seen.append(dict(path=self.path, body=body, auth=self.headers.get("Authorization")))
        status, content, finish, delay = ANSWERS[self.path.removesuffix("/chat/completions")]
        time.sleep(delay)
        if status != 200:
            payload = json.dumps({"error": {"message": content}}).encode()
        else:
            payload = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"], "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}]}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), ChatServer)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def endpoint(url, **kw):
    return EndpointGenerator(url, "test-model", api_key="k123", subjects=["Thunder", "Mango", "Paris"],
                                examples=[dict(GOOD[0], case_id=1)], sleep=lambda s: None, **kw)


@pytest.fixture(scope="module")
def counterfact():
    return data.load_counterfact(n=500)


def test_endpoint_good_answer_sends_the_papers_prompt(server, counterfact):
    ChatServer.seen.clear()
    [g] = endpoint(server + "/good").generate(1)
    assert g.error is None and g.finish_reason == "stop" and g.generator == "endpoint"
    req = ChatServer.seen[-1]
    assert req["path"] == "/good/chat/completions" and req["auth"] == "Bearer k123"
    assert req["body"]["model"] == "test-model" and req["body"]["messages"][0]["role"] == "user"
    prompt = req["body"]["messages"][0]["content"]
    assert prompt == g.prompt and "Generate 10 data points." in prompt
    assert "Thunder's occupation is" in prompt and '"Mango"' in prompt  # HardCF example and subject list
    cands, dropped = validate([g], counterfact)
    assert [(c["subject"], c["target_new"]) for c in cands] == [("Thunder", "architect"), ("Mango", "vegetable")]
    assert dropped.empty
    assert all(c["case_id"] >= CASE_ID_BASE and c["generator"] == "endpoint" and c["rephrase_is_prompt"]
               for c in cands)


@pytest.mark.parametrize("mode, reason", [("/malformed", "malformed_json"), ("/truncated", "truncated"),
                                          ("/refusal", "refusal"), ("/error", "error")])
def test_endpoint_bad_answers_are_counted_and_dropped(server, counterfact, mode, reason):
    gens = endpoint(server + mode).generate(2)  # the run goes on after a bad answer
    cands, dropped = validate(gens, counterfact)
    assert cands == [] and list(dropped.reason) == [reason, reason]
    if mode == "/error":
        assert gens[0].text is None and "500" in gens[0].error


def test_endpoint_timeout_is_respected(server, counterfact):
    t0 = time.perf_counter()
    [g] = endpoint(server + "/slow", timeout=0.5).generate(1)
    assert time.perf_counter() - t0 < 2.5  # the server answers after 3 s
    assert g.text is None and g.error.startswith("timeout")
    _, dropped = validate([g], counterfact)
    assert list(dropped.reason) == ["timeout"]


def test_endpoint_needs_url_and_model(monkeypatch):
    monkeypatch.delenv("HARDEDIT_ENDPOINT", raising=False)
    with pytest.raises(ValueError, match="HARDEDIT_ENDPOINT"):
        EndpointGenerator.from_env(subjects=["a"])
    monkeypatch.setenv("HARDEDIT_ENDPOINT", "http://127.0.0.1:9/v1/")
    monkeypatch.setenv("HARDEDIT_MODEL", "m")
    assert EndpointGenerator.from_env(subjects=["a"]).url == "http://127.0.0.1:9/v1/chat/completions"


def gen(samples, text=None, finish="stop"):
    return Generation("test", "p", json.dumps(samples) if text is None else text, finish)


def test_validation_rejects_each_malformed_kind(counterfact):
    cf = counterfact[0]
    ok = dict(GOOD[0])
    bad = {
        "missing_field": {k: v for k, v in ok.items() if k != "ground_truth"},
        "missing_field ": dict(ok, target_new="  "),
        "missing_field  ": dict(ok, subject=7),
        "subject_not_in_prompt": dict(ok, subject="Lightning"),
        "subject_not_in_prompt ": dict(ok, subject="Thund"),  # part of a word only
        "same_target": dict(ok, target_new="Actor"),
        "duplicate_counterfact": {k: cf[k] for k in FIELDS} | {"target_new": cf["target_new"] + "x"},
        "duplicate_candidate": dict(ok, target_new="plumber"),
        "malformed_sample": "just a string",
    }
    gens = [gen([ok] + list(bad.values())), gen(None, "no json here"), gen(None, "[{\"prompt\": \"a\"", "length"),
            gen(None, "I cannot do that."), gen(None, "{\"prompt\": }"), gen(None, "   "),
            Generation("test", "p", None, error="http error 503: busy"), gen({"samples": [GOOD[1]]})]
    cands, dropped = validate(gens, counterfact)
    assert [c["subject"] for c in cands] == ["Thunder", "Mango"]
    assert list(dropped.reason) == [k.strip() for k in bad] + ["malformed_json", "truncated", "refusal",
                                                               "malformed_json", "empty", "error"]
    assert dropped.generation.tolist() == [0] * len(bad) + [1, 2, 3, 4, 5, 6]
    table = yield_table(gens, cands, dropped)
    assert table.loc[0, "valid"] == 2 and table.loc[0, "dropped_missing_field"] == 3 and table.loc[0, "calls"] == 8


def test_case_ids_are_stable_and_clear_of_counterfact():
    a = case_id_of(GOOD[0])
    assert a == case_id_of(dict(GOOD[0], prompt="  thunder's  occupation is")) and a >= CASE_ID_BASE
    assert a != case_id_of(dict(GOOD[0], target_new="plumber"))


def test_offline_generator_is_seeded_and_valid(tiny_models):
    lm = tiny_models("tiny-llama")
    cf = data.load_counterfact(n=2000)
    make = lambda seed: OfflineGenerator(lm, seed=seed, first_token=False, max_subject_tokens=2, counterfact=cf)
    g0, g1 = make(0).generate(2), make(1).generate(2)
    assert [g.text for g in g0] == [g.text for g in make(0).generate(2)]
    assert [g.text for g in g0] != [g.text for g in g1]
    cands, dropped = validate(g0, cf)
    assert len(g0) == 2 and len(cands) + len(dropped) == 20
    assert set(dropped.reason) <= {"duplicate_candidate", "duplicate_counterfact"}
    templates = {template_of(c) for c in cf}
    by_id = {c["case_id"]: c for c in cf}
    for c in cands:
        assert template_of(c) in templates  # a CounterFact relation ...
        assert len(lm.tok(" " + c["subject"], add_special_tokens=False)["input_ids"]) <= 2  # ... short subject
        assert c["target_new"] != c["ground_truth"] and not c["rephrase_is_prompt"]
        assert c["generator"] == "offline" and "CounterFact case" in c["generation_prompt"]
        source = by_id[int(c["generation_prompt"].split("CounterFact case ")[1].split(":")[0])]
        assert c["locality_prompt"] == source["prompt"] and c["ground_truth"] == source["locality_ground_truth"]


def test_collapse_cases_and_pattern_from_rows(tiny_models):
    lm = tiny_models("tiny-llama")
    cf = data.load_counterfact(n=40)
    rows = pd.DataFrame([dict(c, model="tiny-llama", editor="rome", error=None, ppl=p)
                         for c, p in zip(cf, [5000.0, 20.0] * 20)])
    hard = collapse_cases(rows, model="tiny-llama")
    assert len(hard) == 20 and set(hard.case_id) == {c["case_id"] for c in cf[::2]}
    with pytest.raises(ValueError, match="collapsed"):
        collapse_cases(rows.drop(columns="ppl"))
    table = pattern(lm, hard, reference=cf)
    assert set(table.feature) == {"first_token", "subject_tokens", "relation", "target_tokens"}
    for feat, t in table.groupby("feature"):
        if feat != "relation":
            assert t.rate_collapse.sum() == pytest.approx(1) and t.rate_counterfact.sum() == pytest.approx(1)
    # hand count: the share of the collapse cases whose relation is the first one's
    rel = template_of(cf[0])
    n = sum(template_of(c) == rel for c in cf[::2])
    assert table[(table.feature == "relation") & (table.value == rel)].rate_collapse.item() == pytest.approx(n / 20)


def test_generations_are_stored_as_they_arrive_and_a_rerun_resumes(server, tmp_path):
    """Each answer is appended to the store; a rerun with the same seed asks only for the calls not stored.
    Failed calls are not stored: a rerun asks again."""
    store = generations_store(tmp_path, "m")
    ChatServer.seen.clear()
    first = endpoint(server + "/good").generate(3, store)
    assert len(ChatServer.seen) == 3 and len(store.read()) == 3
    rows = store.read().sort_values("call")
    assert list(rows.call) == [0, 1, 2] and rows.response.iloc[0]["choices"][0]["message"]["content"] == first[0].text
    again = endpoint(server + "/good").generate(4, generations_store(tmp_path, "m"))
    assert len(ChatServer.seen) == 4  # one new call, the fourth
    assert [(g.prompt, g.text, g.finish_reason) for g in again[:3]] == [(g.prompt, g.text, g.finish_reason)
                                                                       for g in first]
    assert ChatServer.seen[-1]["body"]["messages"][0]["content"] == again[3].prompt
    other = endpoint(server + "/good", seed=1).generate(1, store)  # other prompts: asked, not taken from the store
    assert len(ChatServer.seen) == 5 and other[0].prompt != first[0].prompt
    failed = generations_store(tmp_path, "failed")
    assert endpoint(server + "/error").generate(1, failed)[0].error and failed.read().empty
    endpoint(server + "/error").generate(1, failed)
    assert len(ChatServer.seen) == 5 + 2 * 4  # each run asked again (4 attempts: 3 retries)


@pytest.fixture
def small_counterfact(monkeypatch):
    """CounterFact cut to 300 cases wherever the pipeline loads it (the CLI reads the whole of it)."""
    cf = data.load_counterfact(n=300)
    monkeypatch.setattr(data, "load_counterfact", lambda n=None, seed=0: cf[:n] if n else list(cf))
    return cf


def test_cli_writes_under_results_and_survives_bad_answers(server, small_counterfact, tmp_path, monkeypatch):
    """Default --out is under --results-dir, never data/; answers whose content is not text are rejections;
    --limit 0 on an empty store writes an empty dataset; the chat answers and candidates are saved."""
    for module in ("cli.hardedit", "hardcases.hardedit", "hardcases.hardcf", "hardcases.generate", "hardcases.pattern"):
        monkeypatch.setattr(f"editcollapse.{module}.in_repo",
                            lambda p: Path(p) if Path(p).is_absolute() else tmp_path / "repo" / p)
    hardcf = tmp_path / "hardcf.json"
    hardcf.write_text(json.dumps(small_counterfact[:4]))
    monkeypatch.setenv("HARDEDIT_ENDPOINT", server + "/int")
    monkeypatch.setenv("HARDEDIT_MODEL", "test-model")
    results = tmp_path / "results"
    monkeypatch.chdir(tmp_path)  # relative command-line paths are read from the current directory
    main(["--model", "tiny-llama", "--hardcf", "hardcf.json", "--offline-calls", "1", "--endpoint-calls", "2",
             "--limit", "0", "--results-dir", "results", "--timeout", "5"])
    assert not (tmp_path / "repo").exists()  # nothing under the repository, data/ least of all
    assert json.loads((results / "hardedit_tiny-llama.json").read_text()) == []
    assert isinstance(json.loads((results / "hardedit_candidates_tiny-llama.json").read_text()), list)
    stored = generations_store(results, "tiny-llama").read()
    assert len(stored) == 2 and list(stored.text) == [7, 7]
    candidates = [dict(c, generator="offline", generation_prompt="p", generation_settings={}, rephrase_is_prompt=True)
                  for c in small_counterfact[:2]]
    (results / "hardedit_candidates_tiny-llama.json").write_text(json.dumps(candidates))
    main(["--model", "tiny-llama", "--hardcf", str(hardcf), "--reuse-candidates", "--limit", "0",
             "--results-dir", str(results)])  # no row measured yet: an empty dataset
    assert json.loads((results / "hardedit_tiny-llama.json").read_text()) == []
    assert not (tmp_path / "repo").exists()
