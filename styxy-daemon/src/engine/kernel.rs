//! The engine's kernel side and published state: the kernel sessions' maps, the session table the
//! shims map, and the ports old TCP connections still hold (lingering).

use super::{lock, Engine};
use crate::bpf::sessions::KernelSessions;
use crate::table::PublishedTable;
use styxy_broker::Effects;

impl Engine {
    /// Publishes the session table from now on, starting with everything the broker knows.
    pub fn publish_table(&self, table: PublishedTable) {
        let broker = lock(&self.broker);
        table.publish_all(&broker);
        let _ = self.table.set(table);
    }

    /// Marks the session table stopped and removes it (on the way out).
    pub fn close_table(&self) {
        if let Some(table) = self.table.get() {
            table.close();
        }
    }

    /// The eBPF programs enforce kernel sessions from now on, starting with everything the broker knows.
    pub fn use_kernel_sessions(&self, sessions: KernelSessions) {
        let broker = lock(&self.broker);
        sessions.publish_all(&broker);
        // The sessions of the last run whose processes still run are theirs again.
        let (adopted, processes) = sessions.adopt(&broker);
        if adopted > 0 {
            tracing::info!(
                sessions = adopted,
                processes,
                "kernel sessions of the last run put back"
            );
        }
        let _ = self.kernel_sessions.set(sessions);
    }

    /// How many kernel sessions have a live process (`None`: the kernel manages none).
    pub fn live_kernel_sessions(&self) -> Option<usize> {
        self.kernel_sessions
            .get()
            .map(KernelSessions::live_sessions)
    }

    /// Says why the kernel manages no sessions (for `Status` and `styxy run`).
    pub fn set_kernel_sessions_missing(&self, why: String) {
        *lock(&self.kernel_sessions_missing) = why;
    }

    /// A reading of the ports TCP connections sit on, begun with
    /// [`Engine::begin_lingering_reading`], for the broker's lingering ports; the kernel's
    /// ephemeral ports outside every range (clients' connections) are left out. Published like
    /// any decision, so the kernel's spare ports leave them too.
    pub fn set_lingering(&self, ports: Vec<u16>) {
        let (low, high) = crate::bpf::ephemeral_ports();
        self.commit_effects(|b| {
            let wanted: Vec<u16> = ports
                .into_iter()
                .filter(|p| !(low..=high).contains(p) || b.ranges().type_of_port(*p).is_some())
                .collect();
            b.set_lingering(wanted);
            Effects::default()
        });
    }

    /// Completes after a TCP socket's release (one wake-up for any number of them).
    pub async fn tcp_released(&self) {
        self.tcp_released.notified().await;
    }

    /// A reading of the ports TCP connections sit on begins (see [`Engine::set_lingering`]).
    pub fn begin_lingering_reading(&self) {
        lock(&self.broker).begin_lingering_reading();
    }

    /// How many ports the broker holds lingering.
    pub fn lingering_count(&self) -> usize {
        lock(&self.broker).lingering_count()
    }

    /// The service ranges, in the broker's order (the kernel numbers them by it).
    pub fn range_bounds(&self) -> Vec<(u16, u16)> {
        lock(&self.broker)
            .ranges()
            .types()
            .iter()
            .map(|t| (t.start, t.end))
            .collect()
    }

    /// Whether `instance` has a kernel session (a number its processes carry): only then can a
    /// focus on it be followed.
    pub fn has_kernel_session(&self, instance: &str) -> bool {
        self.kernel_sessions
            .get()
            .is_some_and(|k| k.number_of(instance).is_some())
    }

    /// The instance of kernel session `number`.
    pub fn kernel_instance_of(&self, number: u32) -> Option<String> {
        self.kernel_sessions.get()?.instance_of(number)
    }

    /// Once a second: the session programs detach when no kernel session has been live for a
    /// few seconds.
    pub fn detach_idle_session_programs(&self) {
        if let Some(sessions) = self.kernel_sessions.get() {
            sessions.detach_if_idle(&lock(&self.broker));
        }
    }
}
