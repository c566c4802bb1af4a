"""The expert-review page (§2.6, Appendix B.1), end to end in a headless Debian chromium driven by selenium: every item
is answered, the page is reloaded once (the progress must survive), the answers are exported (download and DOM) and
scored into Table B1. The images are small generated pictures (the page does not care what they show), so the test
needs no dataset. Without chromium the test is skipped, unless DIFFUSEGEN_REQUIRE_BROWSER is set (CI): then it fails."""

import json
import os
import time
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from diffusegen.core import DiffusegenError
from diffusegen.survey import build_survey, score_survey, read_answers, RATINGS, SURVEY_TYPES

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _pool(d: Path, n_per_type: int = 10) -> pd.DataFrame:
    rng, rows = np.random.default_rng(0), []
    for t in SURVEY_TYPES:
        for k in range(n_per_type + 2):  # more candidates than shown: the selection is seeded
            img = np.clip(rng.normal(120, 40, (48, 48, 3)), 0, 255).astype(np.uint8)
            m = np.zeros((48, 48), np.uint8)
            m[rng.integers(4, 20) : rng.integers(28, 44), rng.integers(4, 20) : rng.integers(28, 44)] = 255
            ip, mp = d / f"{t}_{k}_img.png", d / f"{t}_{k}_mask.png"
            Image.fromarray(img).save(ip)
            Image.fromarray(m).save(mp)
            rows.append({"type": t, "image_path": str(ip), "mask_path": str(mp), "source_id": f"src{t}{k}"})
    return pd.DataFrame(rows)


def _require_browser(chromium: Path = CHROMIUM, chromedriver: Path = CHROMEDRIVER):
    "Skip without chromium, or fail when DIFFUSEGEN_REQUIRE_BROWSER is set (CI installs it and sets the variable)."
    if not (chromium.exists() and chromedriver.exists()):
        msg = f"headless browser test needs {chromium} and {chromedriver} (apt-get install chromium chromium-driver)"
        if os.environ.get("DIFFUSEGEN_REQUIRE_BROWSER"):
            pytest.fail(msg + "; DIFFUSEGEN_REQUIRE_BROWSER is set, so this is an error")
        pytest.skip(msg)


def test_missing_browser_fails_only_when_required(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFUSEGEN_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception):
        _require_browser(tmp_path / "no-chromium", tmp_path / "no-driver")
    monkeypatch.setenv("DIFFUSEGEN_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="DIFFUSEGEN_REQUIRE_BROWSER is set"):
        _require_browser(tmp_path / "no-chromium", tmp_path / "no-driver")


@pytest.fixture
def driver(tmp_path):
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for f in FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        opts.add_argument(f)
    dl = tmp_path / "downloads"
    dl.mkdir()
    opts.add_experimental_option(
        "prefs", {"download.default_directory": str(dl), "download.prompt_for_download": False}
    )
    drv = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    drv.download_dir = dl
    try:
        drv.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(dl)})
    except Exception:
        pass
    yield drv
    drv.quit()


def _answer(drv, item: str, q: str, value: str):
    from selenium.webdriver.common.by import By

    drv.find_element(By.CSS_SELECTOR, f'input[name="{item}-{q}"][value="{value}"]').click()


def _plan(k: int) -> dict:
    "A deterministic answer for the k-th item."
    return {"image": RATINGS[k % 3], "seg": RATINGS[(k // 3) % 3], "rf": ("Real", "Fake")[k % 2]}


def test_survey_end_to_end(tmp_path, driver):
    from selenium.webdriver.common.by import By

    (tmp_path / "imgs").mkdir()
    pool = _pool(tmp_path / "imgs")
    html, key = tmp_path / "figs" / "survey.html", tmp_path / "runs" / "survey_key.csv"
    info = build_survey(pool, html, key, n_per_type=10, seed=0)
    assert info["items"] == 30 and info["per_type"] == {"Real": 10, "Diff": 10, "Styled-Diff": 10}
    page = html.read_text()
    # self-contained and blind: images embedded, nothing fetched, no source ids / type names / file names in the page
    assert page.count("data:image/png;base64,") == 60
    assert "http://" not in page and "https://" not in page and "src=\"data:" in page
    for bad in ["srcReal", "srcDiff", "styled", "diff", "_img.png", str(tmp_path)]:
        assert bad.lower() not in page.lower(), bad
    assert not (html.parent / "survey_key.csv").exists()
    items = pd.read_csv(key).item.tolist()

    driver.get(html.as_uri())
    half = len(items) // 2
    for k, it in enumerate(items[:half]):
        for q, v in _plan(k).items():
            _answer(driver, it, q, v)
    assert driver.find_element(By.ID, "progress").text == f"Answered {half} of 30"
    driver.refresh()  # progress must survive a reload (localStorage)
    assert driver.find_element(By.ID, "progress").text == f"Answered {half} of 30"
    for k, it in enumerate(items[:half]):
        for q, v in _plan(k).items():
            assert driver.find_element(By.CSS_SELECTOR, f'input[name="{it}-{q}"][value="{v}"]').is_selected(), (it, q)
    for k, it in enumerate(items[half:], start=half):
        for q, v in _plan(k).items():
            _answer(driver, it, q, v)
    assert driver.find_element(By.ID, "progress").text == "Answered 30 of 30"

    # the answers as the page holds them (DOM), and as the download button writes them
    dom = json.loads(driver.find_element(By.ID, "answers-json").get_attribute("textContent"))
    (tmp_path / "dom_answers.json").write_text(json.dumps(dom))
    driver.find_element(By.ID, "export-json").click()
    target = driver.download_dir / "survey_answers.json"
    for _ in range(100):
        if target.exists() and target.stat().st_size > 0:
            break
        time.sleep(0.1)
    assert target.exists(), f"no download in {driver.download_dir}: {list(driver.download_dir.iterdir())}"
    downloaded = json.loads(target.read_text())
    assert downloaded["answers"] == dom["answers"] and downloaded["survey"] == info["survey"]
    driver.find_element(By.ID, "export-csv").click()  # the CSV export: the same answers, with the survey id
    csv = driver.download_dir / "survey_answers.csv"
    for _ in range(100):
        if csv.exists() and csv.stat().st_size > 0:
            break
        time.sleep(0.1)
    got = pd.read_csv(csv, dtype=str, keep_default_na=False)
    assert list(got.columns) == ["item", "image", "seg", "rf", "survey"] and (got.survey == info["survey"]).all()
    assert got.drop(columns="survey").to_dict("records") == dom["answers"]
    assert score_survey(csv, key)[0].equals(score_survey(target, key)[0])

    # score: Table B1 counts must be exactly what was clicked
    table, metrics = score_survey(target, key)
    ans = read_answers(tmp_path / "dom_answers.json")
    assert len(ans) == 30 and ans[["image", "seg", "rf"]].notna().all().all()
    truth = pd.read_csv(key).set_index("item").type
    expect = pd.DataFrame([{"type": truth[it], **_plan(k)} for k, it in enumerate(items)])
    t = table.set_index("type")
    for typ in SURVEY_TYPES:
        e = expect[expect.type == typ]
        for r in RATINGS:
            assert t.loc[typ, f"image {r}"] == (e.image == r).sum() and t.loc[typ, f"seg {r}"] == (e.seg == r).sum()
        assert t.loc[typ, "Real"] == (e.rf == "Real").sum() and t.loc[typ, "Fake"] == (e.rf == "Fake").sum()
        assert t.loc[typ, "unanswered"] == 0
    said_fake, is_fake = expect.rf == "Fake", expect.type != "Real"
    assert metrics["answered"] == 30
    assert abs(metrics["positive_real"]["accuracy"] - (said_fake == is_fake).mean()) < 1e-12
    tp = int((said_fake & is_fake).sum())
    assert (
        metrics["positive_fake"]["tp"] == tp
        and abs(metrics["positive_fake"]["precision"] - tp / said_fake.sum()) < 1e-12
    )


def test_answers_for_another_survey_are_refused(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    pool = _pool(d, 2)
    build_survey(pool, tmp_path / "a.html", tmp_path / "a.csv", 2, seed=0)
    build_survey(pool, tmp_path / "b.html", tmp_path / "b.csv", 2, seed=1)
    items = pd.read_csv(tmp_path / "a.csv")
    survey = items.survey[0]
    (tmp_path / "ans.json").write_text(
        json.dumps(
            {
                "survey": survey,
                "answers": [{"item": it, "image": "Good", "seg": "Good", "rf": "Real"} for it in items.item],
            }
        )
    )
    table, m = score_survey(tmp_path / "ans.json", tmp_path / "a.csv")
    assert table.n.sum() == 6 and m["answered"] == 6
    with pytest.raises(DiffusegenError, match="belong to survey"):
        score_survey(tmp_path / "ans.json", tmp_path / "b.csv")


def test_a_rebuilt_survey_keeps_the_old_key(tmp_path):
    "Answers to an earlier page are scored against that page's key, found by survey id, after the key file was rebuilt."
    d = tmp_path / "imgs"
    d.mkdir()
    pool = _pool(d, 2)
    key = tmp_path / "runs" / "survey_key.csv"
    first = build_survey(pool, tmp_path / "survey.html", key, 2, seed=0)
    items = pd.read_csv(key)
    ans = pd.DataFrame(
        {
            "item": items.item,
            "image": "Good",
            "seg": "Good",
            "rf": ["Real" if t == "Real" else "Fake" for t in items.type],
        }
    )
    ans.assign(survey=first["survey"]).to_csv(tmp_path / "ans.csv", index=False)
    second = build_survey(
        pool, tmp_path / "survey.html", key, 2, seed=1
    )  # a new survey: survey_key.csv now holds its key
    assert second["survey"] != first["survey"] and set(pd.read_csv(key).survey) == {second["survey"]}
    table, m = score_survey(tmp_path / "ans.csv", key)
    assert (
        m["key"].endswith(f"survey_key_{first['survey']}.csv") and m["positive_real"]["accuracy"] == 1.0
    )  # the right key
    (tmp_path / "runs" / f"survey_key_{first['survey']}.csv").unlink()
    with pytest.raises(DiffusegenError, match=f"belong to survey {first['survey']}"):
        score_survey(tmp_path / "ans.csv", key)


def test_answers_are_validated(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    info = build_survey(_pool(d, 2), tmp_path / "s.html", tmp_path / "key.csv", 2, seed=0)
    items = pd.read_csv(tmp_path / "key.csv").item.tolist()
    base = pd.DataFrame({"item": items, "image": "Good", "seg": "Poor", "rf": "Real", "survey": info["survey"]})

    def score(df, name="a.csv"):
        df.to_csv(tmp_path / name, index=False)
        return score_survey(tmp_path / name, tmp_path / "key.csv")

    assert score(base)[1]["answered"] == 6
    bad = base.copy()
    bad.loc[2, "rf"] = "fake"  # not one of the page's options
    with pytest.raises(DiffusegenError, match=rf"a.csv: item {items[2]} has rf = 'fake' \(allowed: Real, Fake"):
        score(bad)
    bad = base.copy()
    bad.loc[1, "image"] = "good"
    with pytest.raises(DiffusegenError, match=f"item {items[1]} has image = 'good'"):
        score(bad)
    with pytest.raises(DiffusegenError, match=f"a.csv: item {items[0]} is answered more than once"):
        score(pd.concat([base, base.head(1)]))
    with pytest.raises(DiffusegenError, match="a.csv: the answers carry no survey id"):
        score(base.drop(columns="survey"))
    pd.read_csv(tmp_path / "key.csv").drop(columns="type").to_csv(tmp_path / "key.csv", index=False)
    with pytest.raises(DiffusegenError, match="key.csv: the answer key has no type column"):
        score(base)
