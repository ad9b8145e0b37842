//! Why the broker refused a request.

/// Why the broker refused a request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BrokerError {
    #[error("no free port left in {service_type} range {start}-{end}")]
    /// Every port of the range is bound, leased or claimed.
    NoFreePort {
        /// The service type whose range is full.
        service_type: String,
        /// First port of the range.
        start: u16,
        /// Last port of the range.
        end: u16,
    },
    /// A service type nobody configured.
    #[error(transparent)]
    UnknownServiceType(#[from] crate::ranges::UnknownServiceType),
    /// The user holds its share already; root and the shim's claims are not limited.
    #[error("uid {uid} holds {held} lease(s) {what}, its limit: release one (`styxy ports`, `styxy release ID`), or raise [limits] {setting} in the daemon's config")]
    UserLimit {
        /// The caller.
        uid: u32,
        /// How many it holds.
        held: usize,
        /// Which limit: over all ranges, or in one range.
        what: String,
        /// The config setting that raises it.
        setting: &'static str,
    },
    /// The instance id belongs to another user.
    #[error("instance {id} belongs to uid {owner_uid}; another user may not take, extend or end it (pick another id)")]
    InstanceTaken {
        /// The id asked for.
        id: String,
        /// Its owner.
        owner_uid: u32,
    },
    #[error("no lease {0}")]
    /// No lease has this id.
    NoSuchLease(String),
    #[error("no lease on port {0}")]
    /// The port has no lease.
    NoLeaseOnPort(u16),
    #[error("lease {lease_id} belongs to uid {owner_uid}; only that user or root may release it")]
    /// The lease is another user's.
    NotOwner {
        /// The lease asked for.
        lease_id: String,
        /// Its owner.
        owner_uid: u32,
    },
    /// No session has this id or name.
    #[error("no session {0}: `styxy status` lists the sessions by name and id")]
    NoSuchSession(String),
    /// The session is another user's: only its owner (or root) may give it the focus.
    #[error("session {id} belongs to uid {owner_uid}; only that user or root may focus it")]
    NotYourSession {
        /// The session asked for.
        id: String,
        /// Its owner.
        owner_uid: u32,
    },
}
