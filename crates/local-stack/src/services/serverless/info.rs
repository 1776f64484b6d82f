//! `INFO` trimmed to what a serverless cache reports.

use super::resp::{bulk, line};

/// `INFO`'s reply with only the sections and fields a serverless cache documents.
pub(super) fn trim_info(reply: &[u8], evicted_keys: bool) -> Vec<u8> {
    if reply.first() != Some(&b'$') {
        return reply.to_vec();
    }
    let Some((_, head_len)) = line(reply) else {
        return reply.to_vec();
    };
    let body = String::from_utf8_lossy(&reply[head_len..reply.len().saturating_sub(2)]);
    let mut out = String::new();
    let mut section = String::new();
    for text in body.split("\r\n") {
        if let Some(name) = text.strip_prefix("# ") {
            section = name.trim().to_owned();
            if matches!(
                section.as_str(),
                "Server" | "Clients" | "Memory" | "Stats" | "Keyspace"
            ) {
                if !out.is_empty() {
                    out.push_str("\r\n");
                }
                out.push_str(text);
                out.push_str("\r\n");
            }
            continue;
        }
        if text.is_empty() {
            continue;
        }
        let field = text.split(':').next().unwrap_or_default();
        let keep = match section.as_str() {
            "Server" => field.contains("version") || field == "server_name",
            "Clients" | "Keyspace" => true,
            "Memory" => field.starts_with("used_memory"),
            "Stats" => evicted_keys || field != "evicted_keys",
            _ => false,
        };
        if keep {
            out.push_str(text);
            out.push_str("\r\n");
        }
    }
    bulk(out.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::super::resp::reply_len;
    use super::*;

    #[test]
    fn info_keeps_the_documented_sections() {
        let body = "# Server\r\nredis_version:7.0.15\r\nos:Linux\r\n\r\n# Memory\r\nused_memory:1\r\nmaxmemory:2\r\n\r\n# Replication\r\nrole:master\r\n\r\n# Stats\r\nevicted_keys:3\r\nexpired_keys:0\r\n";
        let trimmed = trim_info(&bulk(body.as_bytes()), false);
        let text = String::from_utf8(trimmed).unwrap();
        assert!(text.contains("redis_version:7.0.15"), "{text}");
        assert!(text.contains("used_memory:1"), "{text}");
        assert!(text.contains("expired_keys:0"), "{text}");
        for gone in ["os:", "maxmemory:", "Replication", "role:", "evicted_keys"] {
            assert!(!text.contains(gone), "{gone}: {text}");
        }
        assert_eq!(reply_len(text.as_bytes()).unwrap(), Some(text.len()));
    }
}
