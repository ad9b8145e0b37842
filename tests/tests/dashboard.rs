//! The dashboard at `http://styxy.localhost/`, as a person uses it: headless Chromium (driven
//! by playwright-core) opens it; a server started in a session afterwards appears on the page
//! without a reload, with a link to its name that reaches it; a screenshot is saved as a test
//! artefact (`target/test-artifacts/dashboard.png`). Without JavaScript (curl) the page is whole,
//! and `/state.json` has the same data; `styxy open` opens it in `$BROWSER`.

use std::process::Command;

use anyhow::{Context, Result};
use styxy_tests::names::{bound_port, curl, daemon_with_proxy, http_server_in, worktrees};
use styxy_tests::{chromium, eventually, playwright_core, Spawned};

/// Opens the dashboard, says `ready` once it has loaded, and on stdin's cue waits up to a
/// second for session `NAME`'s server to appear (no reload: the window's mark stays), follows its
/// link, and saves a screenshot.
const WATCH_THE_DASHBOARD: &str = r#"
const { chromium } = require(process.argv[1]);
const [url, session, screenshot] = process.argv.slice(2);
(async () => {
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--disable-background-networking',
           '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
  });
  const page = await browser.newPage({ viewport: { width: 1200, height: 800 } });
  const live = page.waitForResponse(r => r.url().endsWith('/events'), { timeout: 10000 });
  await page.goto(url);
  await live;
  await page.evaluate(() => { window.__styxyMark = 'same window'; });
  console.log('sessions before', await page.locator('article.session').count());
  console.log('ready');
  await new Promise(r => process.stdin.once('data', r));
  const started = Date.now();
  await page.waitForSelector(`article[data-session="${session}"] td a`, { timeout: 1000 });
  console.log('appeared after', Date.now() - started, 'ms');
  console.log('mark', await page.evaluate(() => window.__styxyMark || 'reloaded'));
  await page.screenshot({ path: screenshot, fullPage: true });
  const link = page.locator(`article[data-session="${session}"] td a`).first();
  console.log('link', await link.getAttribute('href'));
  await link.click();
  await page.waitForLoadState();
  console.log('followed', (await page.textContent('body')).trim());
  await browser.close();
})().catch(e => { console.log('Error', e.message); process.exit(1); });
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_server_started_in_a_session_appears_on_the_dashboard_without_a_reload() -> Result<()> {
    let (Some(playwright), Some(_)) = (playwright_core(), chromium()) else {
        return Ok(());
    };
    let (daemon, proxy) = daemon_with_proxy().await?;
    let work = tempfile::tempdir()?;
    worktrees(work.path())?;
    let asked = daemon.base + 10;
    // feature-x runs before the page opens; feature-y's server starts while it is open.
    let _x = http_server_in(&daemon, "dash-x", &work.path().join("feature-x"), asked)?;
    let dashboard = format!("http://styxy.localhost:{proxy}/");
    eventually(10, "feature-x on the dashboard", || async {
        curl(&dashboard, &[])
            .ok()
            .filter(|(_, page)| page.contains("data-session=\"feature-x\""))
    })
    .await?;
    let artefacts =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artefacts)?;
    let screenshot = artefacts.join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let mut browser = Spawned::start(
        Command::new("node")
            .args(["-e", WATCH_THE_DASHBOARD])
            .arg(&playwright)
            .arg(&dashboard)
            .arg("feature-y")
            .arg(&screenshot),
    )?;
    let before = browser.line_where(60, |l| {
        l.starts_with("sessions before") || l.starts_with("Error")
    })?;
    assert_eq!(before, "sessions before 1");
    browser.line_where(20, |l| l == "ready" || l.starts_with("Error"))?;

    // feature-y's server starts (moved: feature-x holds the port). Once the daemon has it, the
    // page has a second to show it.
    let _y = http_server_in(&daemon, "dash-y", &work.path().join("feature-y"), asked)?;
    let moved_to = eventually(10, "Y bound", || async {
        bound_port(&daemon, "dash-y", asked).await.ok()
    })
    .await?;
    browser.send_line("go")?;
    let appeared =
        browser.line_where(20, |l| l.starts_with("appeared") || l.starts_with("Error"))?;
    assert!(appeared.starts_with("appeared after"), "{appeared}");
    eprintln!("dashboard: feature-y {appeared}");
    let mark = browser.line_where(10, |l| l.starts_with("mark") || l.starts_with("Error"))?;
    assert_eq!(mark, "mark same window", "the page reloaded");
    let link = browser.line_where(10, |l| l.starts_with("link") || l.starts_with("Error"))?;
    assert_eq!(link, format!("link http://feature-y.localhost:{proxy}/"));
    let followed =
        browser.line_where(20, |l| l.starts_with("followed") || l.starts_with("Error"))?;
    assert_eq!(followed, "followed I am feature-y");
    assert!(
        std::fs::metadata(&screenshot)
            .map(|m| m.len() > 1000)
            .unwrap_or(false),
        "a screenshot at {}",
        screenshot.display()
    );
    eprintln!("dashboard screenshot: {}", screenshot.display());

    // Without JavaScript: the page as served has both sessions, the move and the links.
    let (code, page) = curl(&dashboard, &[])?;
    assert_eq!(code, 200);
    for expected in [
        "data-session=\"feature-x\"",
        "data-session=\"feature-y\"",
        &format!("{asked} → {moved_to}"),
        &format!("href=\"http://feature-y.localhost:{proxy}/\""),
    ] {
        assert!(page.contains(expected), "{expected} in {page}");
    }
    let (_, json) = curl(&format!("http://styxy.localhost:{proxy}/state.json"), &[])?;
    let state: serde_json::Value = serde_json::from_str(&json).context("state.json")?;
    let y = state["sessions"]
        .as_array()
        .context("sessions")?
        .iter()
        .find(|s| s["name"] == "feature-y")
        .context("feature-y in state.json")?;
    assert_eq!(y["servers"][0]["asked"], asked, "{y}");
    assert_eq!(y["servers"][0]["port"], moved_to, "{y}");
    assert!(
        y["servers"][0]["moved_off"]
            .as_str()
            .is_some_and(|m| m.contains("session feature-x")),
        "{y}"
    );
    // `styxy open`: the dashboard in $BROWSER, a name's URL with --print.
    let opened = work.path().join("opened");
    let browser_script = work.path().join("browser.sh");
    std::fs::write(
        &browser_script,
        format!("#!/bin/sh\necho \"$1\" > {}\n", opened.display()),
    )?;
    std::fs::set_permissions(
        &browser_script,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let said = daemon
        .cli_command(&["open"])
        .env("BROWSER", &browser_script)
        .output()?;
    assert_eq!(
        String::from_utf8_lossy(&said.stdout),
        format!("{dashboard}\n")
    );
    let seen = eventually(10, "the browser started", || async {
        std::fs::read_to_string(&opened).ok()
    })
    .await?;
    assert_eq!(seen, format!("{dashboard}\n"));
    let said = daemon.cli(&["open", "--print", "storybook.feature-y"]);
    assert_eq!(
        String::from_utf8_lossy(&said.stdout),
        format!("http://storybook.feature-y.localhost:{proxy}/\n")
    );
    // Anything else there is a clear 404.
    let (code, said) = curl(&format!("http://styxy.localhost:{proxy}/nothing"), &[])?;
    assert_eq!(code, 404);
    assert!(said.contains("/events"), "{said}");
    Ok(())
}

/// The live page follows the daemon's state, not only binds: a session registered (or ended,
/// or focused with `styxy focus`) sends an `event: change` at once, with no socket bound.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_registered_or_ended_is_an_event_of_the_live_page() -> Result<()> {
    let (daemon, proxy) = daemon_with_proxy().await?;
    let mut events = Spawned::start(Command::new("curl").args([
        "-sS",
        "-N",
        "-m",
        "30",
        &format!("http://styxy.localhost:{proxy}/events"),
    ]))?;
    // The stream is open once its first keep-alive or event could come: give curl its connect.
    eventually(10, "the event stream connected", || async {
        let listed = std::process::Command::new("ss")
            .args(["-tnH", "state", "established", &format!("dport = :{proxy}")])
            .output()
            .ok()?;
        (!listed.stdout.is_empty()).then_some(())
    })
    .await?;
    let mut sleeper = Spawned::start(Command::new("sleep").arg("60"))?;
    let mut client = daemon.client().await?;
    client
        .register_instance(styxy_tests::v1::RegisterInstanceRequest {
            instance_id: Some("live-page".into()),
            pid: sleeper.child.id(),
            name: None,
        })
        .await?;
    events.line_where(10, |l| l == "event: change")?;
    client
        .end_instance(styxy_tests::v1::EndInstanceRequest {
            instance_id: "live-page".into(),
            stop_servers: false,
        })
        .await?;
    events.line_where(10, |l| l == "event: change")?;
    sleeper.kill()?;
    Ok(())
}
