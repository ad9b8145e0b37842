//! How the names' URLs are written, the same in the daemon's answers and the agent's context:
//! `https://feature-x.localhost/` when the proxy has the scheme's own port, else with the port.

/// The dashboard's name (`http://styxy.localhost/`); no session is given its first label.
pub const DASHBOARD_HOST: &str = "styxy.localhost";
/// The session name the dashboard keeps for itself.
pub const DASHBOARD_LABEL: &str = "styxy";

/// The proxy's entry the URLs point at: HTTPS when it serves HTTPS, else plain HTTP; `None`
/// when it serves neither. The arguments are listen addresses (`127.0.0.1:443`), empty when that
/// listener does not run.
pub fn proxy_entry<'a>(http: &'a str, https: &'a str) -> Option<(&'static str, &'a str)> {
    if !https.is_empty() {
        Some(("https", https))
    } else if !http.is_empty() {
        Some(("http", http))
    } else {
        None
    }
}

/// `scheme://name[:port]/` for the proxy listening at `listen`; the port is left out when it is
/// the scheme's own (80, 443).
pub fn name_url(scheme: &str, name: &str, listen: &str) -> String {
    let port = listen.rsplit(':').next().unwrap_or_default();
    let default = matches!((scheme, port), ("http", "80") | ("https", "443"));
    if default || port.is_empty() {
        format!("{scheme}://{name}/")
    } else {
        format!("{scheme}://{name}:{port}/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schemes_own_port_is_left_out() {
        assert_eq!(
            name_url("http", "a.localhost", "127.0.0.1:80"),
            "http://a.localhost/"
        );
        assert_eq!(
            name_url("https", "a.localhost", "127.0.0.1:443"),
            "https://a.localhost/"
        );
        assert_eq!(
            name_url("https", "a.localhost", "127.0.0.1:80"),
            "https://a.localhost:80/"
        );
        assert_eq!(
            name_url("http", "a.localhost", "[::1]:8080"),
            "http://a.localhost:8080/"
        );
    }

    #[test]
    fn https_is_preferred() {
        assert_eq!(proxy_entry("", ""), None);
        assert_eq!(
            proxy_entry("127.0.0.1:80", ""),
            Some(("http", "127.0.0.1:80"))
        );
        assert_eq!(
            proxy_entry("127.0.0.1:80", "127.0.0.1:443"),
            Some(("https", "127.0.0.1:443"))
        );
    }
}
