//! The names over HTTPS (`styxy daemon --proxy-tls`), trusted the way a user trusts them: two
//! sessions in two git worktrees serve the same asked port; before `styxy trust` curl and
//! Chromium refuse the local CA's certificates; after it, curl (HTTP/2 by ALPN), python's urllib
//! and node's `fetch` (resolving `*.localhost` through glibc's nss-myhostname) and headless
//! Chromium reach each session by its name; a Firefox profile's database has it too; `styxy
//! untrust` leaves the system store and the NSS databases as they were. Then a real Vite in
//! Chromium (driven by playwright-core): the page loads through its name over http (HTTP/1.1)
//! and https (HTTP/2, its HMR WebSocket on the same connection by RFC 8441's extended
//! CONNECT), and an edit arrives by HMR without a reload.
//!
//! `styxy trust` changes the machine's system store, so these need root (they say so and skip
//! otherwise); tests here run one at a time.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use styxy_tests::names::{curl, daemon_with_proxy_and, http_server_in, vite_in_shop, worktrees};
use styxy_tests::{chromium, eventually, is_root, playwright_core, vite, Daemon, Spawned};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A daemon with the proxy over http and https (and `extra` arguments), and the two ports.
async fn daemon_with_https(extra: &[&str]) -> Result<(Daemon, u16, u16)> {
    let mut args = vec!["--proxy-tls", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let (daemon, http) = daemon_with_proxy_and(&args).await?;
    let status = daemon.status().await?;
    let https = status
        .proxy_tls_listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("the proxy's https address in Status: {status:?}"))?;
    Ok((daemon, http, https))
}

/// What `styxy untrust` must give back: the system bundle, the links beside it and the local
/// certificates' directory.
fn system_store() -> Result<(Vec<u8>, Vec<String>, Vec<String>)> {
    let listing = |dir: &str| -> Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .map(|e| {
                let target = std::fs::read_link(e.path())
                    .map(|t| format!(" -> {}", t.display()))
                    .unwrap_or_default();
                format!("{}{target}", e.file_name().to_string_lossy())
            })
            .collect();
        names.sort();
        Ok(names)
    };
    Ok((
        std::fs::read("/etc/ssl/certs/ca-certificates.crt")?,
        listing("/etc/ssl/certs")?,
        listing("/usr/local/share/ca-certificates")?,
    ))
}

/// The certificates' nicknames in the NSS database in `dir`.
fn nss_listing(dir: &Path) -> Result<String> {
    let out = Command::new("certutil")
        .arg("-L")
        .arg("-d")
        .arg(format!("sql:{}", dir.display()))
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `styxy untrust` (with `home`) when dropped, so a failing test leaves no CA behind.
struct Untrust<'a> {
    daemon: &'a Daemon,
    home: &'a Path,
}

impl Drop for Untrust<'_> {
    fn drop(&mut self) {
        let _ = self
            .daemon
            .cli_command(&["untrust"])
            .env("HOME", self.home)
            .output();
    }
}

/// curl's exit code for `url` (60: it could not verify the certificate).
fn curl_exit(url: &str) -> Result<Option<i32>> {
    Ok(Command::new("curl")
        .args(["-sS", "-m", "10", "-o", "/dev/null", url])
        .output()?
        .status
        .code())
}

#[tokio::test(flavor = "multi_thread")]
async fn https_names_are_trusted_by_every_client_after_trust_and_untrust_leaves_the_stores_as_they_were(
) -> Result<()> {
    if !is_root() {
        eprintln!("SKIP: `styxy trust` changes the system store, which needs root");
        return Ok(());
    }
    let Some(chromium) = chromium() else {
        return Ok(());
    };
    let _one = ONE_AT_A_TIME.lock().await;
    // The store as `update-ca-certificates` makes it from what is there: a machine may hold an
    // authority dropped in /usr/local/share/ca-certificates and never brought in (a sandbox's
    // egress CA, placed at boot), which any run of it — `styxy trust`'s too — brings in. What
    // trust and untrust leave is compared with that.
    let refreshed = Command::new("update-ca-certificates").output()?;
    ensure!(
        refreshed.status.success(),
        "update-ca-certificates: {refreshed:?}"
    );
    let before = system_store()?;
    let (daemon, _http, https) = daemon_with_https(&[]).await?;
    let work = tempfile::tempdir()?;
    worktrees(work.path())?;
    let asked = daemon.base + 16;
    let _x = http_server_in(&daemon, "tls-x", &work.path().join("feature-x"), asked)?;
    let _y = http_server_in(&daemon, "tls-y", &work.path().join("feature-y"), asked)?;
    let home = work.path().join("home");
    std::fs::create_dir_all(&home)?;
    // A Firefox profile, as Firefox leaves one (its NSS database made with certutil here).
    let firefox = home.join(".mozilla/firefox/t3st.default-release");
    std::fs::create_dir_all(&firefox)?;
    let made = Command::new("certutil")
        .args(["-N", "--empty-password", "-d"])
        .arg(format!("sql:{}", firefox.display()))
        .output()?;
    ensure!(made.status.success(), "certutil -N: {made:?}");
    let chromium_db = home.join(".pki/nssdb");
    let x_url = format!("https://feature-x.localhost:{https}/");
    let y_url = format!("https://feature-y.localhost:{https}/");

    // Before: the certificates are the local CA's, which nobody trusts yet.
    eventually(10, "both names served over https", || async {
        let x = curl(&x_url, &["--insecure"]).ok()?;
        let y = curl(&y_url, &["--insecure"]).ok()?;
        (x == (200, "I am feature-x\n".into()) && y == (200, "I am feature-y\n".into()))
            .then_some(())
    })
    .await?;
    assert_eq!(
        curl_exit(&x_url)?,
        Some(60),
        "curl must refuse an untrusted CA"
    );
    let refused = chromium.dump_dom(&x_url, &home)?;
    assert!(!refused.contains("I am feature-x"), "{refused}");

    // `styxy trust`: the system store and the NSS database of HOME.
    let _untrust = Untrust {
        daemon: &daemon,
        home: &home,
    };
    let trusted = daemon.cli_command(&["trust"]).env("HOME", &home).output()?;
    let said = String::from_utf8_lossy(&trusted.stdout);
    ensure!(trusted.status.success(), "styxy trust: {trusted:?}");
    assert!(
        said.contains("added            system store")
            && said.contains("added            Chromium")
            && said.contains("added            Firefox profile t3st.default-release"),
        "{said}"
    );
    assert!(nss_listing(&chromium_db)?.contains("Styxy local CA"));
    assert!(nss_listing(&firefox)?.contains("Styxy local CA"));

    // curl, over HTTP/2 (ALPN) and HTTP/1.1.
    let out = Command::new("curl")
        .args(["-sS", "-m", "10", "-w", "\n%{http_version}", &x_url])
        .output()?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "I am feature-x\n\n2",
        "{out:?}"
    );
    assert_eq!(
        curl(&y_url, &["--http1.1"])?,
        (200, "I am feature-y\n".into())
    );
    // python's urllib and node's fetch resolve the names through glibc.
    let python = Command::new("python3")
        .args([
            "-c",
            "import socket, sys, urllib.request as u\n\
             print(sorted({a[4][0] for a in socket.getaddrinfo('feature-x.localhost', 1)}))\n\
             print(u.urlopen(sys.argv[1], timeout=10).read().decode(), end='')",
            &x_url,
        ])
        .output()?;
    assert_eq!(
        String::from_utf8_lossy(&python.stdout),
        "['127.0.0.1', '::1']\nI am feature-x\n",
        "glibc must resolve *.localhost (nss-myhostname): {python:?}"
    );
    let status = daemon.status().await?;
    let ca_file = format!(
        "/usr/local/share/ca-certificates/styxy-local-ca-{}.crt",
        &status.local_ca_fingerprint[..16]
    );
    let node = Command::new("node")
        .args([
            "-e",
            "fetch(process.argv[1]).then(r => r.text()).then(t => process.stdout.write(t))",
            &y_url,
        ])
        .env("NODE_EXTRA_CA_CERTS", &ca_file)
        .output()?;
    assert_eq!(
        String::from_utf8_lossy(&node.stdout),
        "I am feature-y\n",
        "{node:?}"
    );
    // Chromium, through its NSS database.
    for (url, whose) in [(&x_url, "I am feature-x"), (&y_url, "I am feature-y")] {
        let dom = chromium.dump_dom(url, &home)?;
        assert!(dom.contains(whose), "{url}: {dom}");
    }

    // `styxy untrust`: as it was.
    let untrusted = daemon
        .cli_command(&["untrust"])
        .env("HOME", &home)
        .output()?;
    ensure!(untrusted.status.success(), "styxy untrust: {untrusted:?}");
    let after = system_store()?;
    assert_eq!(
        (after.1, after.2),
        (before.1, before.2),
        "the system store's files changed"
    );
    assert!(after.0 == before.0, "the system bundle changed");
    assert!(!nss_listing(&chromium_db)?.contains("Styxy"));
    assert!(!nss_listing(&firefox)?.contains("Styxy"));
    assert_eq!(curl_exit(&x_url)?, Some(60));
    Ok(())
}

/// Drives Debian's Chromium with playwright-core: opens the page, waits for Vite's HMR to
/// connect, marks the window, edits the module (through the test, on stdin's cue), and prints
/// the heading after the edit and whether the window is the same (no reload).
const HMR_IN_CHROMIUM: &str = r#"
const { chromium } = require(process.argv[1]);
const [url, home] = [process.argv[2], process.argv[3]];
(async () => {
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--disable-background-networking',
           '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
    env: { ...process.env, HOME: home },
  });
  const page = await browser.newPage();
  const connected = page.waitForEvent('console', { predicate: m => m.text().includes('[vite] connected'), timeout: 20000 });
  await page.goto(url);
  await connected;
  console.log('heading', await page.textContent('h1'));
  await page.evaluate(() => { window.__styxyMark = 'same window'; });
  console.log('ready');
  await new Promise(r => process.stdin.once('data', r));
  await page.waitForFunction(() => document.querySelector('h1').textContent.includes('edited'), null, { timeout: 20000 });
  console.log('heading', await page.textContent('h1'));
  console.log('mark', await page.evaluate(() => window.__styxyMark || 'reloaded'));
  const http = await page.evaluate(() => performance.getEntriesByType('navigation')[0].nextHopProtocol);
  console.log('navigation', http);
  await browser.close();
})().catch(e => { console.log('Error', e.message); process.exit(1); });
"#;

#[tokio::test(flavor = "multi_thread")]
async fn vite_in_chromium_through_its_name_over_http_and_https_gets_hmr() -> Result<()> {
    if !is_root() {
        eprintln!("SKIP: trusting the local CA for Chromium's https needs root");
        return Ok(());
    }
    let (Some(vite), Some(playwright), Some(_)) = (vite(), playwright_core(), chromium()) else {
        return Ok(());
    };
    let vite = vite.to_str().context("utf-8 path")?.to_string();
    let _one = ONE_AT_A_TIME.lock().await;
    // The daemon counts the WebSockets it opens by how the browser asked (metrics).
    let block = styxy_tests::port_block();
    let metrics = format!("127.0.0.1:{}", block + 1);
    let (daemon, http, https) = daemon_with_https(&["--metrics", &metrics]).await?;
    let work = tempfile::tempdir()?;
    let home = work.path().join("home");
    std::fs::create_dir_all(&home)?;
    let app = work.path().join("storefront");
    std::fs::create_dir_all(&app)?;
    std::fs::write(
        app.join("index.html"),
        "<!doctype html><html><body><h1 id=\"title\">storefront</h1>\
         <script type=\"module\" src=\"/main.js\"></script></body></html>\n",
    )?;
    let module = |heading: &str| {
        format!(
            "import {{ heading }} from './heading.js';\n\
             document.querySelector('h1').textContent = heading;\n\
             if (import.meta.hot) import.meta.hot.accept();\n\
             // {heading}\n"
        )
    };
    std::fs::write(app.join("main.js"), module("v1"))?;
    std::fs::write(
        app.join("heading.js"),
        "export const heading = 'storefront v1';\n",
    )?;
    let _server = vite_in_shop(&daemon, &vite, &app, daemon.base + 18)?;
    let trusted = daemon.cli_command(&["trust"]).env("HOME", &home).output()?;
    let _untrust = Untrust {
        daemon: &daemon,
        home: &home,
    };
    ensure!(trusted.status.success(), "styxy trust: {trusted:?}");
    let mut edits = 0;
    for (url, protocol) in [
        (format!("http://shop.localhost:{http}/"), "http/1.1"),
        (format!("https://shop.localhost:{https}/"), "h2"),
    ] {
        eventually(10, "Vite by its name", || async {
            curl(&url, &["--insecure"])
                .ok()
                .filter(|(code, body)| *code == 200 && body.contains("/@vite/client"))
        })
        .await?;
        edits += 1;
        std::fs::write(
            app.join("heading.js"),
            format!("export const heading = 'storefront v{edits}';\n"),
        )?;
        let mut browser = Spawned::start(
            Command::new("node")
                .args(["-e", HMR_IN_CHROMIUM])
                .arg(&playwright)
                .arg(&url)
                .arg(&home),
        )?;
        let heading =
            browser.line_where(60, |l| l.starts_with("heading") || l.starts_with("Error"))?;
        assert_eq!(heading, format!("heading storefront v{edits}"), "{url}");
        browser.line_where(20, |l| l == "ready" || l.starts_with("Error"))?;
        std::fs::write(
            app.join("heading.js"),
            format!("export const heading = 'storefront v{edits}, edited';\n"),
        )?;
        browser.send_line("go")?;
        let heading =
            browser.line_where(30, |l| l.starts_with("heading") || l.starts_with("Error"))?;
        assert_eq!(
            heading,
            format!("heading storefront v{edits}, edited"),
            "{url}"
        );
        let mark = browser.line_where(10, |l| l.starts_with("mark") || l.starts_with("Error"))?;
        assert_eq!(
            mark, "mark same window",
            "{url}: the edit reloaded the page"
        );
        let navigation = browser.line_where(10, |l| {
            l.starts_with("navigation") || l.starts_with("Error")
        })?;
        assert_eq!(navigation, format!("navigation {protocol}"), "{url}");
        // Over https the browser opened its WebSocket on the HTTP/2 connection (RFC 8441).
        let (_, counted) = curl(&format!("http://{metrics}/metrics"), &[])?;
        let over = if protocol == "h2" { "h2" } else { "http/1.1" };
        let line = format!("styxy_proxy_websockets_total{{over=\"{over}\"}}");
        assert!(
            counted
                .lines()
                .any(|l| l.starts_with(&line) && !l.ends_with(" 0")),
            "{line} in {counted}"
        );
    }
    styxy_tests::give_back_port_block(block);
    Ok(())
}
