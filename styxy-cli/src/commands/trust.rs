//! `styxy trust` and `styxy untrust`: the daemon's local certificate authority (behind
//! `https://NAME.localhost`) added to, or removed from, the system's trust store and the
//! browsers' NSS databases (see `trust_stores`); `--print` writes its certificate for any
//! other tool (Node.js: `NODE_EXTRA_CA_CERTS`).

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use styxy_proto::v1 as pb;

use super::Client;
use crate::output::{call, print_json};
use crate::trust_stores::{nss, system, Authority, Change, Outcome, StoreOwner};

#[derive(Clone, Debug, clap::Args)]
pub(crate) struct Args {
    /// Print the authority's certificate (PEM) and change nothing.
    #[arg(long)]
    print: bool,
}

/// Adds (`trust`) or removes the authority; fails when a store could not be changed.
pub(super) async fn run(
    client: &mut Client,
    args: Args,
    trust: bool,
    as_json: bool,
    deadline: Duration,
) -> Result<()> {
    let answer = tokio::time::timeout(deadline, client.local_ca(pb::LocalCaRequest {}))
        .await
        .map_err(|_| anyhow!("the Styxy daemon did not answer within {deadline:?}"))?;
    let ca = call(answer)?;
    if args.print {
        out!("{}", ca.certificate_pem);
        return Ok(());
    }
    let authority = Authority {
        certificate_pem: ca.certificate_pem,
        fingerprint: ca.fingerprint_sha256,
    };
    let owner = StoreOwner::invoking();
    // certutil and update-ca-certificates take a second or so: off the client's runtime.
    let outcomes = tokio::task::spawn_blocking({
        let authority = authority.clone();
        move || change_stores(&authority, owner.as_ref(), trust)
    })
    .await?;
    if as_json {
        print_json(&serde_json::json!({
            "fingerprint_sha256": authority.fingerprint,
            "stores": outcomes,
        }))?;
    } else {
        print_outcomes(&authority, &outcomes, trust);
    }
    let failed: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| matches!(o.result, Change::Failed(_)))
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} store(s) could not be changed: {}",
            failed.len(),
            failed
                .iter()
                .map(|o| o.store.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

fn change_stores(authority: &Authority, owner: Option<&StoreOwner>, trust: bool) -> Vec<Outcome> {
    let mut outcomes = vec![if trust {
        system::add(authority)
    } else {
        system::remove(authority)
    }];
    match owner {
        Some(owner) if trust => outcomes.extend(nss::add(authority, owner)),
        Some(owner) => outcomes.extend(nss::remove(authority, owner)),
        None => outcomes.push(Outcome {
            store: "browsers (NSS)".into(),
            path: Default::default(),
            result: Change::Skipped("HOME is not set: no browser databases to change".into()),
        }),
    }
    outcomes
}

fn print_outcomes(authority: &Authority, outcomes: &[Outcome], trust: bool) {
    outln!(
        "Styxy local CA (for *.localhost only), SHA-256 {}",
        authority.fingerprint
    );
    for o in outcomes {
        let (word, detail) = match (&o.result, trust) {
            (Change::Changed, true) => ("added", String::new()),
            (Change::Changed, false) => ("removed", String::new()),
            (Change::AlreadyDone, true) => ("already trusted", String::new()),
            (Change::AlreadyDone, false) => ("not there", String::new()),
            (Change::Skipped(why), _) => ("skipped", format!(": {why}")),
            (Change::Failed(why), _) => ("FAILED", format!(": {why}")),
        };
        let path = if o.path.as_os_str().is_empty() {
            String::new()
        } else {
            format!(" ({})", o.path.display())
        };
        outln!("  {word:<16} {}{path}{detail}", o.store);
    }
    if trust {
        let system_file = system::certificate_path(authority).filter(|p| p.exists());
        let node = match &system_file {
            Some(file) => format!("export NODE_EXTRA_CA_CERTS={}", file.display()),
            None => "styxy trust --print > ~/.styxy-ca.pem; export \
                     NODE_EXTRA_CA_CERTS=~/.styxy-ca.pem"
                .to_string(),
        };
        outln!("Node.js reads its own list of authorities: {node}");
        outln!("A browser that was running reads its store again when restarted.");
    }
}
