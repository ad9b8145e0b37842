//! A name as it appears in a host name (`feature-x` in `storybook.feature-x.localhost`): the
//! daemon makes session names into labels, and the CLI checks the one a user gives.

use std::string::String;

/// `text` as a DNS label: lowercase letters, digits and inner dashes, at most 63 bytes; `None`
/// when nothing of it is left.
pub fn dns_label(text: &str) -> Option<String> {
    let mut label = String::new();
    for c in text.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            label.push(c);
        } else if !label.ends_with('-') && !label.is_empty() {
            label.push('-');
        }
        if label.len() >= 63 {
            break;
        }
    }
    let label = label.trim_end_matches('-').to_string();
    (!label.is_empty()).then_some(label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_dns_labels() {
        assert_eq!(
            dns_label("Feature_X/login").as_deref(),
            Some("feature-x-login")
        );
        assert_eq!(dns_label("--a--b--").as_deref(), Some("a-b"));
        assert_eq!(dns_label("école").as_deref(), Some("cole"));
        assert_eq!(dns_label("///"), None);
        assert_eq!(dns_label(&"x".repeat(100)).map(|l| l.len()), Some(63));
    }
}
