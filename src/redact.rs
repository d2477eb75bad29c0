//! Keeps Redis credentials out of logs and error messages.

/// Replaces the password of every `scheme://user:password@host` URL in `text` with `***`, and
/// the value of every `pass=` query parameter (`unix:///run/redis.sock?user=u&pass=p`).
///
/// A URL runs to the next whitespace or quote. Its credentials end at its last `@`, so a
/// password that was not percent-encoded (holding `/`, `?`, `#` or `@`) is hidden whole.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c.is_whitespace() || c == '"' || c == '\'')
            .unwrap_or(tail.len());
        let url = &tail[..end];
        let after_userinfo = match url.rfind('@') {
            Some(at) => {
                let userinfo = &url[..at];
                match userinfo.find(':') {
                    Some(c) => {
                        out.push_str(&userinfo[..c]);
                        out.push_str(":***");
                    }
                    None => out.push_str("***"),
                }
                &url[at..]
            }
            None => url,
        };
        out.push_str(&redact_query_password(after_userinfo));
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// `pass=<value>` query parameters with the value replaced.
fn redact_query_password(url: &str) -> String {
    let Some(q) = url.find('?') else {
        return url.to_owned();
    };
    let (path, query) = url.split_at(q + 1);
    let params: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, _))
                if k.eq_ignore_ascii_case("pass") || k.eq_ignore_ascii_case("password") =>
            {
                format!("{k}=***")
            }
            _ => p.to_owned(),
        })
        .collect();
    format!("{path}{}", params.join("&"))
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn hides_passwords() {
        assert_eq!(
            redact("cannot reach redis://worker:s3cret@10.0.0.1:6379/0 now"),
            "cannot reach redis://worker:***@10.0.0.1:6379/0 now"
        );
        assert_eq!(redact("redis://:pw@h"), "redis://:***@h");
        assert_eq!(redact("rediss://tok@h:1"), "rediss://***@h:1");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact("no url"), "no url");
    }

    #[test]
    fn hides_passwords_that_were_not_percent_encoded() {
        assert_eq!(
            redact("at redis://u:pa/ss@h:1/0: refused"),
            "at redis://u:***@h:1/0: refused"
        );
        assert_eq!(redact("rediss://u:p@ss#x@h"), "rediss://u:***@h");
        assert_eq!(
            redact("--redis-url 'redis://u:a?b@h' and redis://h2/1"),
            "--redis-url 'redis://u:***@h' and redis://h2/1"
        );
    }

    #[test]
    fn hides_unix_socket_passwords() {
        assert_eq!(
            redact("unix:///run/redis.sock?user=w&pass=s3cret&db=1"),
            "unix:///run/redis.sock?user=w&pass=***&db=1"
        );
        assert_eq!(
            redact("redis://h/?protocol=resp3"),
            "redis://h/?protocol=resp3"
        );
    }
}
