"Statistics (§2.8): the paper audit's verdicts against hand computations, and the stage on small synthetic results."

import contextlib
import io
import os
import re
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from diffusegen.core import load_config, read_manifest, DataError
from diffusegen import statistics as S
from diffusegen import audit as A
from diffusegen.sets import RESULT_COLUMNS, type_label, type_labels
from diffusegen.cli import main

ROOT = Path(__file__).resolve().parents[1]
# the paper's text (not in the repository: its licence is the publisher's), for the tests that check our tables against it
PAPER_MD = Path(os.environ.get("DIFFUSEGEN_PAPER_MD", ROOT / "data" / "paper" / "paper.md"))


@pytest.fixture(scope="module")
def audit():
    return A.audit_paper().set_index("claim")


# --- the paper's tables as data ---------------------------------------------------------------------------------


def _paper_tables():
    if not PAPER_MD.exists():
        pytest.skip(f"the paper's text is not at {PAPER_MD}")
    lines = PAPER_MD.read_text().replace("<b>", "").replace("</b>", "").splitlines()

    def block(start):
        i = next(k for k, l in enumerate(lines) if l.startswith(start))
        return lines[i : i + 40]

    return block("**Table 1:**"), block("**Table 2:**"), block("**Table 3:**"), block("**Table B1:**")


NAME = {v: k for k, v in type_labels().items()}


def test_paper_csvs_transcribe_the_papers_tables():
    "data/paper/table*.csv hold exactly the numbers of the paper's tables (parsed here from paper.md)."
    t1, t2, t3, b1 = _paper_tables()
    got = {}
    for l in t1:  # Type<TAB>FID set 1..3<TAB>MS-SSIM set 1..3
        c = [x for x in l.split("\t") if x.strip()]
        if c and c[0] in NAME and NAME[c[0]] != "real":
            v = [float(x) for x in c[1:]]
            for s in range(3):
                got[(NAME[c[0]], s)] = (v[s], v[3 + s])
    ours = A.load_paper_tables()["t1"].query("type != 'real'")
    assert {(r.type, r.repeat): (r.fid, r.msssim) for r in ours.itertuples()} == got and len(got) == 15
    got = {}
    for l in t2:  # Type-N<TAB>DL<TAB>IoU
        c = l.split("\t")
        m = re.fullmatch(r"(.+?)(?:-(\d))?:?", c[0].strip())
        if len(c) == 3 and m and m[1] in NAME:
            got[(NAME[m[1]], int(m[2] or 1))] = (float(c[1]), float(c[2]))
    seg = A.load_paper_tables()["seg"]
    assert {(r.type, r.n): (r.dice_loss, r.iou) for r in seg.query("table == 2").itertuples()} == got and len(got) == 16
    got, n = {}, None
    for l in t3:  # N<TAB>Type<TAB>(DL<TAB>IoU) per r; Real has one pair
        c = l.split("\t")
        if len(c) < 3 or c[1].strip() not in NAME:
            continue
        n = int(c[0]) if c[0].strip() else n
        v = [float(x) for x in c[2:] if x.strip()]
        t = NAME[c[1].strip()]
        for j in range(len(v) // 2):
            got[(t, n, 0 if t == "real" else j + 1)] = (v[2 * j], v[2 * j + 1])
    assert {(r.type, r.n, r.r): (r.dice_loss, r.iou) for r in seg.query("table == 3").itertuples()} == got and len(
        got
    ) == 28
    got = {}
    for l in b1:
        c = l.split("\t")
        if c[0] in NAME:
            got[NAME[c[0]]] = [int(x) for x in c[1:]]
    b = A.load_paper_tables()["b1"].set_index("type").drop(columns="ref")
    assert {t: list(map(int, r)) for t, r in b.iterrows()} == got


def test_every_claim_is_derivable_and_quoted_from_the_text():
    claims = A.load_claims()
    assert claims.claim.is_unique and len(claims) > 50
    if PAPER_MD.exists():
        norm = lambda s: re.sub(r"[−\-±_\s{}$\\\"*]", "", s.replace("\\pm", "±"))  # ignore maths markup and spacing
        text = norm(PAPER_MD.read_text())
        for q in set(claims.quote):
            assert norm(q) in text, q[:60]
    df = A.audit_paper()
    assert set(df.verdict) <= {"✓", "⚠", "✗"} and len(df) == len(claims)


# --- the audit's verdicts, each checked by a computation done here ---------------------------------------------


def test_styled_diff_fid_mean_std_agrees(audit):
    fid = np.array([66.17, 65.48, 66.32])  # Table 1, Styled-Diff
    hand = f"{fid.mean():.2f} ± {fid.std():.2f}"  # population std, as the text
    assert hand == "65.99 ± 0.37" and f"{fid.std(ddof=1):.2f}" == "0.45"
    assert audit.loc["s32-fid-sd", "verdict"] == "✓" and audit.loc["abs-fid-sd", "verdict"] == "✓"


def test_full_styled_diff_iou_mean_is_not_supported(audit):
    iou = np.array([0.5751, 0.5534, 0.5213])  # Table 2, Full-Styled-Diff-1..3
    assert f"{iou.mean():.4f}" != "0.5450" and f"{iou.std():.4f}" == "0.0221"
    assert audit.loc["s33-t2-fsd-iou", "verdict"] == "✗"
    assert f"{iou.mean():.4f}" in audit.loc["s33-t2-fsd-iou", "why"]


def test_reported_exact_p_values_agree(audit):
    p_dl = sps.ttest_rel([0.2556, 0.2272, 0.1958], [0.3486, 0.3923, 0.4351]).pvalue  # Styled-Diff vs Full-Styled-Diff
    p_iou = sps.ttest_rel([0.6840, 0.7027, 0.7396], [0.5751, 0.5534, 0.5213]).pvalue
    assert (f"{p_dl:.4f}", f"{p_iou:.4f}") == ("0.0592", "0.0381")
    assert audit.loc["s33-t2-sd-fsd-p-dl", "verdict"] == audit.loc["s33-t2-sd-fsd-p-iou", "verdict"] == "✓"
    p = sps.ttest_1samp([0.6326, 0.6609, 0.6765], 0.6201).pvalue  # Table 3, GAN vs Real at N = 32 (one-sample)
    assert f"{p:.3f}" == "0.104" and audit.loc["s33-t3-n32-gan-real-p-iou", "verdict"] == "✓"
    p = sps.ttest_rel([0.5930, 0.5968, 0.6072], [0.5658, 0.5762, 0.5863]).pvalue  # N = 16, Styled-Diff vs GAN on r
    assert f"{p:.4f}" == "0.0087" and audit.loc["s33-t3-n16-sd-gan-p-iou", "verdict"] == "✓"


def test_p_bound_claims(audit):
    p = sps.ttest_rel([66.17, 65.48, 66.32], [60.15, 59.98, 59.95]).pvalue  # FID Styled-Diff vs Full-Styled-Diff
    assert (p < 0.002) == (audit.loc["s32-fid-sd-vs-full-styled-diff", "verdict"] == "✓")
    p = sps.ttest_1samp([0.4838, 0.4886, 0.5471], 0.6056).pvalue  # N = 16 Styled-Diff DL vs Real
    assert (p < 0.04) == (audit.loc["s33-t3-n16-sd-real-p-dl", "verdict"] == "✓")


def test_trailing_real_by_about_012_is_not_supported(audit):
    sd_dl = np.mean([0.2556, 0.2272, 0.1958])
    sd_iou = np.mean([0.6840, 0.7027, 0.7396])
    gaps = (sd_dl - 0.1320, 0.8085 - sd_iou)
    assert all(abs(g - 0.12) > 0.005 for g in gaps)
    assert audit.loc["s33-t2-sd-real-dl", "verdict"] == audit.loc["s33-t2-sd-real-iou", "verdict"] == "✗"


def test_abstract_augmentation_differences(audit):
    real = {16: 0.6056, 32: 0.5580, 64: 0.4201, 128: 0.1768}
    sd = {
        16: [0.4838, 0.4886, 0.5471],
        32: [0.4366, 0.3392, 0.2856],
        64: [0.2845, 0.2851, 0.2187],
        128: [0.1878, 0.2281, 0.2227],
    }
    d = np.array([v - real[n] for n in real for v in sd[n]])
    assert f"{d.std():.4f}" == "0.0981" and f"{d.mean():.4f}" != "-0.1053"
    assert audit.loc["abs-t3-dl-sd", "verdict"] == "✗"


def test_expert_review_percentages(audit):
    tp, fn = 4, 6  # Real images rated Real / Fake
    fp = 3 + 3  # Diff and Styled-Diff images rated Real
    tn = 7 + 7
    assert ((tp + tn) / 30, tp / (tp + fp), tp / (tp + fn)) == (0.6, 0.4, 0.4)
    assert all(audit.loc[f"b1-{m}", "verdict"] == "✓" for m in ("accuracy", "precision", "recall"))


def test_msssim_within_005_of_real(audit):
    sd = np.array([0.2304, 0.2300, 0.2433])
    assert np.abs(sd - 0.1813).max() > 0.05
    assert audit.loc["s32-msssim-within-styled-diff", "verdict"] == "✗"
    assert audit.loc["s32-msssim-within-gan", "verdict"] == "✓"


# --- the stage, on small synthetic upstream results ------------------------------------------------------------


@pytest.fixture()
def upstream(tmp_path):
    "A results.csv and a table1_values.csv in a temporary out folder, with a missing, a 'not provided' and a 1-value type."
    cfg = load_config(
        "smoke",
        {
            "out": str(tmp_path),
            "table2_types": "real gan diff styled-diff full-diff full-styled-diff",
            "table3_n": "16 32",
            "table3_types": "styled-diff gan",
        },
    )
    rng = np.random.default_rng(0)
    base = dict(
        mode="",
        seed=0,
        dice=0.0,
        val_iou=0.0,
        best_epoch=1,
        epochs=2,
        n_train=8,
        n_val=2,
        n_test=8,
        encoder="tiny",
        status="ok",
        n_syn=0,
        short_of_r=0,
        class_iou="",
        class_dice="",
    )
    rows = [dict(base, table=2, type="real", n=1, r=0, repeat=0, dice_loss=0.2, iou=0.7)]
    for t, ns in (("diff", (1, 2, 3)), ("styled-diff", (1, 2, 3)), ("full-diff", (1,))):
        for n in ns:
            rows.append(
                dict(
                    base,
                    table=2,
                    type=t,
                    n=n,
                    r=0,
                    repeat=0,
                    dice_loss=rng.uniform(0.2, 0.5),
                    iou=rng.uniform(0.4, 0.7),
                )
            )
    rows.append(
        dict(base, table=2, type="gan", n=1, r=0, repeat=0, dice_loss=np.nan, iou=np.nan, status="not provided")
    )
    for n in (16, 32):
        rows.append(dict(base, table=3, type="real", n=n, r=0, repeat=0, dice_loss=0.5, iou=0.6))
        for r in (1, 2, 3):
            rows.append(
                dict(
                    base,
                    table=3,
                    type="styled-diff",
                    n=n,
                    r=r,
                    repeat=0,
                    mode="add",
                    dice_loss=rng.uniform(0.3, 0.5),
                    iou=rng.uniform(0.55, 0.7),
                )
            )
        rows.append(
            dict(
                base,
                table=3,
                type="gan",
                n=n,
                r=1,
                repeat=0,
                mode="add",
                dice_loss=np.nan,
                iou=np.nan,
                status="not provided",
            )
        )
    res = pd.DataFrame(rows).assign(test_set="in-domain")[RESULT_COLUMNS]
    S.results_path(cfg).parent.mkdir(parents=True)
    res.to_csv(S.results_path(cfg), index=False)
    t1 = pd.DataFrame(
        [
            dict(type=t, repeat=k, fid=rng.uniform(10, 100), msssim=rng.uniform(0.15, 0.25))
            for t in ("real", "diff", "styled-diff")
            for k in range(3)
        ]
    )
    S.table1_values_path(cfg).parent.mkdir(parents=True)
    t1.to_csv(S.table1_values_path(cfg), index=False)
    return cfg, res, t1


def test_stage_tables_tests_and_statuses(upstream):
    cfg, res, t1 = upstream
    s = S.run_statistics(cfg, progress=False)
    fd = cfg.fig_dir / "statistics"
    for n in ("table1", "table2", "table3"):
        for ext in (".csv", ".md", ".tex"):
            assert (fd / f"{n}{ext}").stat().st_size > 0
    t2 = pd.read_csv(fd / "table2.csv", keep_default_na=False).set_index("type")
    assert t2.loc["GAN", "status"] == "not provided" and t2.loc["Full-Styled-Diff", "status"] == "missing"
    assert t2.loc["Full-Diff", "p DL vs Styled-Diff"] == "n/a (1 values)"
    sd = res.query("table == 2 and type == 'styled-diff'").sort_values("n")
    df = res.query("table == 2 and type == 'diff'").sort_values("n")
    p = sps.ttest_rel(sd.iou, df.iou).pvalue
    assert (
        t2.loc["Diff", "p IoU vs Styled-Diff"].startswith(f"{p:.3g}")
        and "(paired, k=3)" in t2.loc["Diff", "p IoU vs Styled-Diff"]
    )
    m = sd.dice_loss.to_numpy()
    assert t2.loc["Styled-Diff", "DL"] == f"{m.mean():.4f} ± {m.std():.4f}"
    assert t2.loc["Styled-Diff", "paper DL"] == "0.2262 ± 0.0244"  # the paper's column beside ours
    t3 = pd.read_csv(fd / "table3.csv", keep_default_na=False)
    row = t3[(t3.N == 32) & (t3.type == "Styled-Diff")].iloc[0]
    v = res.query("table == 3 and type == 'styled-diff' and n == 32").iou
    assert (
        row["p IoU vs Real"].startswith(f"{sps.ttest_1samp(v, 0.6).pvalue:.3g}")
        and "one-sample" in row["p IoU vs Real"]
    )
    assert row["p IoU vs GAN"] == "n/a (0 values)"
    assert (t3[t3.type == "GAN"].status == "not provided").all()
    t1o = pd.read_csv(fd / "table1.csv", keep_default_na=False).set_index("type")
    assert t1o.loc["GAN", "status"] == "missing" and t1o.loc["Diff", "status"] == "ok"
    p = sps.ttest_rel(t1.query("type == 'styled-diff'").fid, t1.query("type == 'diff'").fid).pvalue
    assert t1o.loc["Diff", "p FID vs Styled-Diff"].startswith(f"{p:.3g}")
    man = read_manifest(cfg, "statistics")
    paths = {Path(a["path"]).name for a in man["artifacts"]}
    assert {
        "table1.csv",
        "table2.csv",
        "table3.csv",
        "table2.png",
        "table3_add.png",
        "paper_audit.md",
        "tests.csv",
    } <= paths
    assert all(Path(a["path"]).exists() for a in man["artifacts"])
    assert s["segmentation"] and s["intrinsic"] and not any(n.startswith("upstream missing") for n in man["notes"])
    tests = pd.read_csv(fd / "tests.csv")
    assert set(tests.kind) >= {"paired", "one-sample"}


def test_stage_without_upstream_says_so(tmp_path):
    cfg = load_config("smoke", {"out": str(tmp_path)})
    with contextlib.redirect_stdout(io.StringIO()) as out:
        rc = main(["stats", "--profile", "smoke", "--out", str(tmp_path)])
    assert rc == 0 and "table2: " in out.getvalue()
    man = read_manifest(cfg, "statistics")
    assert not man["summary"]["segmentation"] and not man["summary"]["intrinsic"]
    assert sum(n.startswith("upstream missing") for n in man["notes"]) == 2
    t2 = pd.read_csv(cfg.fig_dir / "statistics" / "table2.csv", keep_default_na=False)
    assert t2.status.str.startswith("upstream missing").all() and (t2["paper DL"] != "").all()


def test_bad_results_file_is_one_line(tmp_path):
    cfg = load_config("smoke", {"out": str(tmp_path)})
    S.results_path(cfg).parent.mkdir(parents=True)
    S.results_path(cfg).write_text("table,type\n2,real\n")
    with pytest.raises(DataError, match=r"results.csv: missing column\(s\) n, dice_loss, iou"):
        S.run_statistics(cfg, progress=False)


def test_empty_results_file_is_one_line(tmp_path):
    cfg = load_config("smoke", {"out": str(tmp_path)})
    S.results_path(cfg).parent.mkdir(parents=True)
    S.results_path(cfg).write_text("")  # zero bytes (e.g. a disk that filled up)
    with pytest.raises(DataError, match=r"results\.csv: empty file") as e:
        S.run_statistics(cfg, progress=False)
    assert str(S.results_path(cfg)) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("col,bad", [("n", "two"), ("repeat", ""), ("table", "2.5"), ("r", "x")])
def test_malformed_result_keys_are_rejected(tmp_path, col, bad):
    "A key that is not an integer is a one-line DataError naming the file, not a silent 0."
    cfg = load_config("smoke", {"out": str(tmp_path)})
    rows = pd.DataFrame(
        {
            "table": [2, 2],
            "type": ["real", "diff"],
            "n": [1, 1],
            "r": [0, 0],
            "repeat": [0, 0],
            "dice_loss": [0.2, 0.3],
            "iou": [0.7, 0.6],
        }
    ).astype(str)
    rows.loc[1, col] = bad
    S.results_path(cfg).parent.mkdir(parents=True)
    rows.to_csv(S.results_path(cfg), index=False)
    with pytest.raises(DataError, match=rf"results\.csv: column {col} is not an integer in data row\(s\) 2"):
        S.read_results(cfg)
    rows.loc[1, col] = "1" if col != "table" else "2"
    rows.to_csv(S.results_path(cfg), index=False)
    assert S.read_results(cfg)[col].tolist()[1] == int(rows.loc[1, col])


def _results_with_repeats(repeats: int) -> pd.DataFrame:
    "Synthetic results: Table 2 Real, Styled-Diff, Diff (N = 1..3) and Table 3 at N = 16 (Real; Styled-Diff, GAN r = 1..3)."
    rng = np.random.default_rng(repeats)
    rows = []
    for k in range(repeats):
        rows.append(
            dict(
                table=2,
                type="real",
                n=1,
                r=0,
                mode="",
                repeat=k,
                dice_loss=rng.uniform(0.1, 0.2),
                iou=rng.uniform(0.75, 0.85),
            )
        )
        for t in ("styled-diff", "diff"):
            for n in (1, 2, 3):
                rows.append(
                    dict(
                        table=2,
                        type=t,
                        n=n,
                        r=0,
                        mode="",
                        repeat=k,
                        dice_loss=rng.uniform(0.2, 0.4),
                        iou=rng.uniform(0.55, 0.75),
                    )
                )
        rows.append(
            dict(
                table=3,
                type="real",
                n=16,
                r=0,
                mode="",
                repeat=k,
                dice_loss=rng.uniform(0.5, 0.6),
                iou=rng.uniform(0.5, 0.6),
            )
        )
        for t in ("styled-diff", "gan"):
            for r in (1, 2, 3):
                rows.append(
                    dict(
                        table=3,
                        type=t,
                        n=16,
                        r=r,
                        mode="add",
                        repeat=k,
                        dice_loss=rng.uniform(0.4, 0.6),
                        iou=rng.uniform(0.55, 0.65),
                    )
                )
    return A.normalize_seg(pd.DataFrame(rows))


@pytest.mark.parametrize("repeats", [1, 3])
def test_tests_against_real_across_n_and_r(repeats):
    """§2.8's dependent tests across N (Table 2) and r (Table 3) against Real, whatever seg_repeats: one Real value →
    one-sample; one Real value per repeat → the other set's means over N (r) per repeat, paired with Real on the repeat."""
    cfg = load_config(
        "smoke",
        {
            "table2_types": "real styled-diff diff",
            "table3_n": "16",
            "table3_types": "styled-diff gan",
            "table3_mode": "add",
            "seg_repeats": repeats,
        },
    )
    seg, P = _results_with_repeats(repeats), A.load_paper_tables()
    t2, tests2 = S.table2_stats(cfg, seg, P)
    t3, tests3 = S.table3_stats(cfg, seg, P)
    assert "Welch" not in {t["kind"] for t in tests2 + tests3}

    def expect(x, real):  # x: rows of one type, real: Real's rows
        if repeats == 1:
            return "one-sample", len(x), sps.ttest_1samp(x.iou, real.iou.item()).pvalue
        m = x.groupby("repeat").iou.mean().sort_index()
        return "paired by repeat", repeats, sps.ttest_rel(m, real.set_index("repeat").iou.sort_index()).pvalue

    # Table 2: Styled-Diff (N = 1, 2, 3) against Real (tests are a = Styled-Diff, b = the row's type)
    got = next(t for t in tests2 if t["b"] == "real" and t["metric"] == "iou")
    kind, k, p = expect(seg.query("table == 2 and type == 'styled-diff'"), seg.query("table == 2 and type == 'real'"))
    assert (got["kind"], got["k"]) == (kind, k) and got["p"] == pytest.approx(p, rel=1e-9)
    assert f"({kind}, k={k})" in t2.set_index("type").loc["Real", "p IoU vs Styled-Diff"]
    # Table 2 between synthetic types: paired on (N, repeat)
    got = next(t for t in tests2 if t["b"] == "diff" and t["metric"] == "iou")
    assert (got["kind"], got["k"]) == ("paired", 3 * repeats)
    # Table 3 at N = 16: Styled-Diff and GAN (r = 1, 2, 3) against Real; Styled-Diff against GAN paired on (r, repeat)
    for t in ("styled-diff", "gan"):
        got = next(x for x in tests3 if x["a"] == t and x["b"] == "real" and x["metric"] == "iou")
        kind, k, p = expect(seg.query(f"table == 3 and type == '{t}'"), seg.query("table == 3 and type == 'real'"))
        assert (got["kind"], got["k"]) == (kind, k) and got["p"] == pytest.approx(p, rel=1e-9)
        assert f"({kind}, k={k})" in t3.set_index("type").loc[type_label(t), "p IoU vs Real"]
    got = next(x for x in tests3 if x["a"] == "styled-diff" and x["b"] == "gan" and x["metric"] == "iou")
    assert (got["kind"], got["k"]) == ("paired", 3 * repeats)


def test_stale_rows_are_left_out(upstream):
    cfg, res, t1 = upstream
    stale = (res.table == 2) & (res.type == "diff") & (res.n == 3)
    res.loc[stale, "status"] = "stale: settings changed"
    res.loc[stale, ["dice_loss", "iou"]] = np.nan
    res.to_csv(S.results_path(cfg), index=False)
    S.run_statistics(cfg, progress=False)
    t2 = pd.read_csv(cfg.fig_dir / "statistics" / "table2.csv", keep_default_na=False).set_index("type")
    assert t2.loc["Diff", "k"] == 2 and t2.loc["Diff", "status"].startswith("ok (2 of 3 rows; others: stale")
    assert any("stale" in n for n in read_manifest(cfg, "statistics")["notes"])


def test_cli_stats_paper_needs_no_pipeline(tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["stats", "--paper", "--profile", "smoke", "--out", str(tmp_path)])
    assert rc == 0
    text = out.getvalue()
    assert "✓ s32-fid-sd (§3.2)" in text and "✗ s33-t2-fsd-iou" in text
    md = (tmp_path / "figures" / "smoke" / "statistics" / "paper_audit.md").read_text()
    assert "#### Not supported by the tables" in md and "s33-t2-fsd-iou" in md
    assert not (tmp_path / "runs").exists()
