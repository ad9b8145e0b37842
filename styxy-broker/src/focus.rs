//! Focus: a session's view lent to the person at the keyboard. While a user focuses a session,
//! that user's processes outside every session reach the session's servers at the ports they
//! asked for (`localhost:5173` is the focused session's dev server, for a browser, an OAuth
//! callback, a bookmark). Each user focuses at most one session at a time — per-uid, so one
//! user's focus never redirects another user's traffic — and only a session of their own (root:
//! any). The focus is kept with the session (persisted with it) and ends when the session does.
//!
//! The kernel programs enforce it; here it is plain data: who focuses what, and which
//! destinations a switch changes (the daemon closes the connections that still reach the old
//! ones, so a browser's kept-alive connection does not keep showing the old session).

use std::collections::BTreeMap;

use crate::{Broker, BrokerError, Effects, Instance, Protocol, StateChange, ViewEntry};

/// One user's focus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Focus {
    /// The user whose processes outside the sessions follow it.
    pub uid: u32,
    /// The focused session.
    pub instance_id: String,
}

/// What a focus switch did for one user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FocusChange {
    /// The user whose focus it is.
    pub uid: u32,
    /// The session focused before, if any.
    pub before: Option<String>,
    /// The session focused now, if any.
    pub after: Option<String>,
}

impl FocusChange {
    /// Whether the switch changed anything.
    pub fn changed(&self) -> bool {
        self.before != self.after
    }
}

/// A TCP port whose destination a focus switch changed: connections to `from` made for `asked`
/// now belong to `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Retarget {
    /// The port the user's programs connect to.
    pub asked: u16,
    /// Where it went before the switch.
    pub from: u16,
    /// Where it goes now.
    pub to: u16,
}

/// The TCP ports a switch from `before`'s view to `after`'s changes (a port neither view maps
/// stays where it is: the server bound to it).
pub fn retargets(before: &[ViewEntry], after: &[ViewEntry]) -> Vec<Retarget> {
    let tcp = |view: &[ViewEntry]| -> BTreeMap<u16, u16> {
        view.iter()
            .filter(|e| e.protocol == Protocol::Tcp)
            .map(|e| (e.asked, e.bound))
            .collect()
    };
    let (before, after) = (tcp(before), tcp(after));
    let mut asked: Vec<u16> = before.keys().chain(after.keys()).copied().collect();
    asked.sort_unstable();
    asked.dedup();
    asked
        .into_iter()
        .filter_map(|asked| {
            let from = before.get(&asked).copied().unwrap_or(asked);
            let to = after.get(&asked).copied().unwrap_or(asked);
            (from != to).then_some(Retarget { asked, from, to })
        })
        .collect()
}

impl Broker {
    /// The session a person names: its id, its name, or its name with `.localhost`.
    pub fn session_named(&self, handle: &str) -> Option<&Instance> {
        let handle = handle.trim().trim_end_matches('.');
        if let Some(instance) = self.instances.get(handle) {
            return Some(instance);
        }
        let name = handle
            .strip_suffix(crate::NAME_SUFFIX)
            .unwrap_or(handle)
            .to_ascii_lowercase();
        let id = self
            .session_names()
            .into_iter()
            .find(|s| s.name == name)?
            .instance_id;
        self.instances.get(&id)
    }

    /// The session `uid` focuses, if any.
    pub fn focus_of(&self, uid: u32) -> Option<&Instance> {
        self.instances
            .values()
            .find(|i| i.focused_by.contains(&uid))
    }

    /// Every user's focus, by uid.
    pub fn focuses(&self) -> Vec<Focus> {
        let mut all: Vec<Focus> = self
            .instances
            .values()
            .flat_map(|i| {
                i.focused_by.iter().map(|uid| Focus {
                    uid: *uid,
                    instance_id: i.id.clone(),
                })
            })
            .collect();
        all.sort_by_key(|f| f.uid);
        all
    }

    /// `uid` gives the focus to the session `handle` names (see [`Broker::session_named`]),
    /// taking it from the session it focused before. Only the session's owner or root may.
    pub fn set_focus(
        &mut self,
        handle: &str,
        uid: u32,
    ) -> Result<(FocusChange, Effects), BrokerError> {
        let instance = self
            .session_named(handle)
            .ok_or_else(|| BrokerError::NoSuchSession(handle.to_string()))?;
        if instance.owner_uid != uid && uid != 0 {
            return Err(BrokerError::NotYourSession {
                id: instance.id.clone(),
                owner_uid: instance.owner_uid,
            });
        }
        let id = instance.id.clone();
        let (before, mut effects) = self.take_focus(uid, Some(&id));
        if let Some(instance) = self.instances.get_mut(&id) {
            if !instance.focused_by.contains(&uid) {
                instance.focused_by.push(uid);
                instance.focused_by.sort_unstable();
                effects.changes.push(StateChange::PutInstance {
                    instance: instance.clone(),
                });
            }
        }
        let change = FocusChange {
            uid,
            before,
            after: Some(id),
        };
        Ok((change, effects))
    }

    /// `uid` gives its focus up: its processes outside the sessions reach the real ports again.
    pub fn clear_focus(&mut self, uid: u32) -> (FocusChange, Effects) {
        let (before, effects) = self.take_focus(uid, None);
        let change = FocusChange {
            uid,
            before,
            after: None,
        };
        (change, effects)
    }

    /// Takes `uid`'s focus from every session but `keep`; the session it focused before.
    fn take_focus(&mut self, uid: u32, keep: Option<&str>) -> (Option<String>, Effects) {
        let mut effects = Effects::default();
        let mut before = None;
        for instance in self.instances.values_mut() {
            if !instance.focused_by.contains(&uid) {
                continue;
            }
            before = Some(instance.id.clone());
            if Some(instance.id.as_str()) == keep {
                continue;
            }
            instance.focused_by.retain(|u| *u != uid);
            effects.changes.push(StateChange::PutInstance {
                instance: instance.clone(),
            });
        }
        (before, effects)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{InstanceLabel, LeaseSettings, ProcessId, ServiceRanges};

    fn broker_with(sessions: &[(&str, u32, &str)]) -> Broker {
        let mut broker = Broker::new(ServiceRanges::default(), LeaseSettings::default());
        for (i, (id, uid, project)) in sessions.iter().enumerate() {
            let label = InstanceLabel {
                project: Some(project.to_string()),
                name: None,
            };
            let process = ProcessId {
                pid: 100 + i as u32,
                start_time: 1,
            };
            broker
                .register_named_instance(Some(id.to_string()), process, *uid, label, 1_000)
                .expect("registered");
        }
        broker
    }

    fn entry(asked: u16, bound: u16, protocol: Protocol) -> ViewEntry {
        ViewEntry {
            instance_id: "s".into(),
            protocol,
            asked,
            bound,
            pid: 1,
            uid: 1000,
        }
    }

    #[test]
    fn a_session_is_named_by_id_name_or_host_name() {
        let broker = broker_with(&[("claude-1", 1000, "/src/feature-x")]);
        for handle in ["claude-1", "feature-x", "feature-x.localhost", "Feature-X."] {
            assert_eq!(
                broker.session_named(handle).map(|i| i.id.as_str()),
                Some("claude-1"),
                "{handle}"
            );
        }
        assert!(broker.session_named("feature-y").is_none());
    }

    #[test]
    fn a_user_focuses_one_session_of_their_own_at_a_time() {
        let mut broker = broker_with(&[
            ("a", 1000, "/src/a"),
            ("b", 1000, "/src/b"),
            ("other", 1001, "/src/other"),
        ]);
        let (change, effects) = broker.set_focus("a", 1000).expect("own session");
        assert_eq!(change.before, None);
        assert_eq!(change.after.as_deref(), Some("a"));
        assert_eq!(effects.changes.len(), 1, "{effects:?}");
        let (change, effects) = broker.set_focus("b", 1000).expect("own session");
        assert_eq!(
            (change.before.as_deref(), change.after.as_deref()),
            (Some("a"), Some("b"))
        );
        assert_eq!(effects.changes.len(), 2, "a loses it, b gains it");
        assert_eq!(broker.focus_of(1000).map(|i| i.id.as_str()), Some("b"));
        assert!(broker
            .instances
            .get("a")
            .is_some_and(|i| i.focused_by.is_empty()));

        // Another user's session: refused, and nothing changes.
        assert_eq!(
            broker.set_focus("other", 1000),
            Err(BrokerError::NotYourSession {
                id: "other".into(),
                owner_uid: 1001
            })
        );
        assert_eq!(broker.focus_of(1000).map(|i| i.id.as_str()), Some("b"));
        assert_eq!(
            broker.set_focus("nowhere", 1000).map(|_| ()),
            Err(BrokerError::NoSuchSession("nowhere".into()))
        );

        // Root may focus anyone's session, for root's own processes; the user's focus stays.
        broker.set_focus("other", 0).expect("root");
        assert_eq!(
            broker.focuses(),
            vec![
                Focus {
                    uid: 0,
                    instance_id: "other".into()
                },
                Focus {
                    uid: 1000,
                    instance_id: "b".into()
                }
            ]
        );
        // A user's clear touches only their own focus.
        let (change, _) = broker.clear_focus(1001);
        assert!(!change.changed());
        let (change, _) = broker.clear_focus(1000);
        assert_eq!(change.before.as_deref(), Some("b"));
        assert!(change.changed());
        assert!(broker.focus_of(1000).is_none());
        assert_eq!(broker.focus_of(0).map(|i| i.id.as_str()), Some("other"));
    }

    #[test]
    fn focusing_the_focused_session_again_changes_nothing() {
        let mut broker = broker_with(&[("a", 1000, "/src/a")]);
        broker.set_focus("a", 1000).expect("focused");
        let (change, effects) = broker.set_focus("a", 1000).expect("again");
        assert!(!change.changed());
        assert!(effects.changes.is_empty());
    }

    #[test]
    fn the_focus_survives_a_new_registration_and_ends_with_the_session() {
        let mut broker = broker_with(&[("a", 1000, "/src/a")]);
        broker.set_focus("a", 1000).expect("focused");
        let process = ProcessId {
            pid: 200,
            start_time: 2,
        };
        broker
            .register_instance(Some("a".into()), process, 1000, 2_000)
            .expect("registered again");
        assert_eq!(broker.focus_of(1000).map(|i| i.id.as_str()), Some("a"));
        broker.end_instance("a", 1000).expect("ended");
        assert!(broker.focus_of(1000).is_none());
        assert!(broker.focuses().is_empty());
    }

    #[test]
    fn a_switch_retargets_the_tcp_ports_either_view_maps() {
        let a = [
            entry(5173, 5174, Protocol::Tcp),
            entry(8000, 8001, Protocol::Tcp),
        ];
        let b = [
            entry(5173, 5175, Protocol::Tcp),
            entry(6006, 6007, Protocol::Tcp),
            entry(5353, 5354, Protocol::Udp),
        ];
        assert_eq!(
            retargets(&a, &b),
            vec![
                Retarget {
                    asked: 5173,
                    from: 5174,
                    to: 5175
                },
                Retarget {
                    asked: 6006,
                    from: 6006,
                    to: 6007
                },
                Retarget {
                    asked: 8000,
                    from: 8001,
                    to: 8000
                },
            ]
        );
        // From no focus: the real ports were the destinations.
        assert_eq!(
            retargets(&[], &b[..1]),
            vec![Retarget {
                asked: 5173,
                from: 5173,
                to: 5175
            }]
        );
        assert!(retargets(&a, &a).is_empty());
    }
}
