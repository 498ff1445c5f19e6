// The web dashboard in real headless Chromium (Debian's, driven by
// playwright-core): a lossguardd on free ports, a real training curve
// imported into it and, when the trainer is built, a live AUTO run whose
// correction is applied; then the runs list, a run page's series and
// markers, the log-scale toggle and zoom. Screenshots go to OUT_DIR.
//
//   node dashboard_test.mjs BIN_DIR NODE_MODULES CURVE.csv OUT_DIR [TRAINER]
import { spawn, execFileSync } from "node:child_process";
import { createRequire } from "node:module";
import { mkdtempSync, rmSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import assert from "node:assert/strict";
import readline from "node:readline";

const [binDir, nodeModules, curve, outDir, trainer] = process.argv.slice(2);
const require = createRequire(path.join(nodeModules, "noop.js"));
const { chromium } = require("playwright-core");

const work = mkdtempSync(path.join(tmpdir(), "lossguard-dashboard-"));
mkdirSync(outDir, { recursive: true });
const daemon = spawn(path.join(binDir, "lossguardd"),
  ["--listen=127.0.0.1:0", "--http=127.0.0.1:0", `--db=${path.join(work, "db")}`,
   "--log_level=warning", "--shutdown_grace_s=1"],
  { stdio: ["ignore", "pipe", "inherit"] });
let browser;

async function main() {
  // "lossguardd listening on port N", then "lossguardd dashboard on http port M".
  const lines = readline.createInterface({ input: daemon.stdout });
  const it = lines[Symbol.asyncIterator]();
  const grpcPort = Number((await it.next()).value.split(" ").pop());
  const httpPort = Number((await it.next()).value.split(" ").pop());
  const server = `127.0.0.1:${grpcPort}`;
  const base = `http://127.0.0.1:${httpPort}/`;

  const imported = path.basename(curve, ".csv");
  execFileSync(path.join(binDir, "lossguard"), ["import", curve, "--server", server, "--project", "dev"],
    { stdio: "inherit" });
  let live = null;
  if (trainer) {
    live = "dashboard-live-auto";
    execFileSync(trainer, ["--lr", "0.5", "--steps", "120", "--optimizer", "sgd", "--train-subset", "2000",
      "--eval-every", "40", "--server", server, "--mode", "auto", "--run-id", live, "--quiet"],
      { stdio: "inherit" });
  }

  browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: ["--no-sandbox"] });
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });

  // --- runs list: every run, with its health badge; the state filter.
  await page.goto(base);
  await page.waitForSelector(`tr.run[data-run="${imported}"]`);
  const rows = await page.$$eval("tr.run", (trs) => trs.map((tr) => ({
    run: tr.dataset.run, badge: tr.querySelector(".badge").className, text: tr.innerText })));
  assert.equal(rows.length, live ? 2 : 1, JSON.stringify(rows));
  const row = rows.find((r) => r.run === imported);
  assert.match(row.badge, /badge finished/);
  assert.match(row.text, /divergence/);
  await page.screenshot({ path: path.join(outDir, "dashboard-runs.png"), fullPage: true });
  await page.selectOption("#state-filter", "HEALTHY");
  await page.waitForFunction(() => document.querySelectorAll("tr.run").length === 0);
  await page.selectOption("#state-filter", "");
  await page.waitForSelector("tr.run");

  // --- run page: series and markers render.
  async function openRun(runId) {
    await page.click(`tr.run[data-run="${runId}"] a`);
    await page.waitForFunction(() => {
      const p = document.getElementById("plot");
      return p && Number(p.dataset.points) > 0 && window.lossguardPlot && window.lossguardDrawnMarkers;
    });
    return page.evaluate(() => ({
      points: Number(document.getElementById("plot").dataset.points),
      series: window.lossguardPlot.series.map((s) => s.label),
      lengths: window.lossguardPlot.data.map((d) => d.length),
      finiteLoss: window.lossguardPlot.data[1].filter((v) => v !== null).length,
      finiteVal: window.lossguardPlot.data[2].filter((v) => v !== null).length,
      distr: window.lossguardPlot.scales.y.distr,
      markers: [...document.querySelectorAll("#markers li")].map((li) => li.className),
      drawn: window.lossguardDrawnMarkers.map((m) => m.type + ":" + (m.kind || m.label)),
      advice: document.querySelectorAll("#advice tbody tr").length,
      active: document.getElementById("active").innerText,
    }));
  }
  let r = await openRun(imported);
  assert.deepEqual(r.series, ["step", "loss", "val loss", "LR"]);
  assert.ok(r.points >= 1000, `points ${r.points}`);  // 1500 steps, min/max buckets
  assert.ok(r.finiteLoss > 100 && r.finiteVal > 5, JSON.stringify(r));
  assert.equal(r.distr, 3, "log-scale loss by default");
  assert.ok(r.markers.some((c) => /marker diagnosis divergence/.test(c)), JSON.stringify(r.markers));
  assert.ok(r.drawn.includes("diagnosis:DIVERGENCE"), JSON.stringify(r.drawn));
  assert.ok(r.advice >= 1);
  assert.match(r.active, /divergence[\s\S]*smoothed loss/);
  // The plot's canvas holds drawn pixels (not a blank box).
  const inked = await page.evaluate(() => {
    const c = document.querySelector("#plot canvas");
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
    return n / (c.width * c.height);
  });
  assert.ok(inked > 0.01, `canvas ink ${inked}`);
  await page.screenshot({ path: path.join(outDir, "dashboard-run.png"), fullPage: true });

  // Log-scale toggle and zoom (a drag across the plot narrows x).
  await page.click("#log-scale");
  await page.waitForFunction(() => window.lossguardPlot && window.lossguardPlot.scales.y.distr === 1);
  const before = await page.evaluate(() => window.lossguardPlot.scales.x.max - window.lossguardPlot.scales.x.min);
  const box = await page.locator("#plot .u-over").boundingBox();
  await page.mouse.move(box.x + box.width * 0.2, box.y + box.height / 2);
  await page.mouse.down();
  await page.mouse.move(box.x + box.width * 0.4, box.y + box.height / 2, { steps: 5 });
  await page.mouse.up();
  const after = await page.evaluate(() => window.lossguardPlot.scales.x.max - window.lossguardPlot.scales.x.min);
  assert.ok(after < before * 0.5, `zoom ${before} -> ${after}`);

  if (live) {
    await page.goto(base);
    await page.waitForSelector(`tr.run[data-run="${live}"]`);
    r = await openRun(live);
    assert.ok(r.markers.some((c) => /marker action/.test(c)), JSON.stringify(r.markers));
    // The cut x0.1 (a decay from 0.05 to the run's planned end when 100 or
    // more of its 120 steps are left after it, a plain scale otherwise).
    assert.ok(r.drawn.some((d) => d.startsWith("action:LR x0.1") || d.startsWith("action:cosine 0.05 \u2192 0.0005 over")),
      JSON.stringify(r.drawn));
    await page.screenshot({ path: path.join(outDir, "dashboard-live-run.png"), fullPage: true });
  }
  assert.deepEqual(errors, [], "no script errors");
  console.log("ok: dashboard rendered", imported, live ? `and ${live}` : "", "screenshots in", outDir);
}

try {
  await main();
} catch (e) {
  console.error(e);
  process.exitCode = 1;
} finally {
  if (browser) await browser.close();
  daemon.kill("SIGTERM");
  rmSync(work, { recursive: true, force: true });
}
