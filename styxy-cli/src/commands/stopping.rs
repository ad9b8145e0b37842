//! What `styxy stop` and `styxy prune` share: the grace period they take (seconds, `2.5` or
//! `2.5s`, 0 to 600) and the table of the servers they stopped or would stop.

use std::time::Duration;

use styxy_proto::v1 as pb;

use crate::output::{print_table, table};

/// Parses `--grace`: seconds, fractional or with an `s`, from 0 to 600.
pub(super) fn grace_seconds(text: &str) -> Result<f64, String> {
    let seconds: f64 = text
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(0.0..=600.0).contains(&seconds) {
        return Err("the grace period is 0 to 600 seconds".to_string());
    }
    Ok(seconds)
}

/// The grace period as the daemon takes it: milliseconds, where 0 means "the default" — so a
/// zero grace is sent as 1 ms.
pub(super) fn grace_ms(seconds: f64) -> u32 {
    ((seconds * 1000.0).round() as u32).max(1)
}

/// How long a stopping call may take beyond the daemon's answer: the grace period and the kill.
pub(super) fn longest_wait(grace_seconds: f64) -> Duration {
    Duration::from_secs_f64(grace_seconds) + Duration::from_secs(10)
}

/// Prints the servers stopped (or that would be), one row each; `extra` adds a column of
/// `heading` after PORTS (prune's ended session), one value per server.
pub(super) fn print_stopped(stopped: &[pb::StoppedServer], extra: Option<(&str, &[String])>) {
    let mut headings = vec!["PID", "COMMAND", "PORTS"];
    if let Some((heading, _)) = extra {
        headings.push(heading);
    }
    headings.push("ENDED BY");
    let mut t = table(&headings);
    for (i, s) in stopped.iter().enumerate() {
        let mut ports = s
            .ports
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        if s.asked_port != 0 {
            ports = format!("{ports} (asked {})", s.asked_port);
        }
        let mut row = vec![
            s.pid.to_string(),
            if s.cmdline.is_empty() {
                s.comm.clone()
            } else {
                s.cmdline.clone()
            },
            ports,
        ];
        if let Some((_, values)) = extra {
            row.push(values.get(i).cloned().unwrap_or_else(|| "-".to_string()));
        }
        row.push(if s.ended_by.is_empty() {
            "-".to_string()
        } else {
            s.ended_by.clone()
        });
        t.add_row(row);
    }
    print_table(&t);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grace_takes_fractions_and_a_unit_within_ten_minutes() {
        assert_eq!(grace_seconds("2.5"), Ok(2.5));
        assert_eq!(grace_seconds("3s"), Ok(3.0));
        assert_eq!(grace_seconds("0"), Ok(0.0));
        assert!(grace_seconds("601").is_err());
        assert!(grace_seconds("-1").is_err());
        assert!(grace_seconds("soon").is_err());
    }

    #[test]
    fn a_zero_grace_is_one_millisecond_never_the_default() {
        assert_eq!(grace_ms(0.0), 1);
        assert_eq!(grace_ms(2.5), 2500);
        assert_eq!(grace_ms(600.0), 600_000);
    }
}
