//! The Redis permissions the functions need: an ACL rule list for a least-privilege user.
//!
//! Both functions run the same commands: `GET` (a hit), `EVALSHA` and `SCRIPT LOAD` (the
//! scripts, loaded again after a restart or failover), `WAIT` (replicas confirming a batch),
//! `SET` (a refresh stages its new documents), `MGET` (a single node's delete-mode batch reads
//! its positions), and, from inside the scripts (and directly, for a single node's delete-mode
//! batches), `GET`, `SET`, `DEL` and `RENAME` on the item's keys and its slot's epoch key. On a cluster the topology reads the slot map (`CLUSTER SLOTS`) and, to read from
//! replicas, marks connections `READONLY` and asks each primary which replicas are attached
//! (`INFO replication`). A confirmed batch asks `INFO replication` too (only that section:
//! `+info|replication`, a first-argument rule: it checks the first argument only, so
//! `INFO replication server` passes too; `INFO` shows statistics, never keys), and the apply script asks `INFO stats` for the node's eviction count
//! (`+info|stats`; refused, the guard applies refreshes as deletes); the lease scripts read the
//! node's clock (`TIME`), which dates every lease by one clock. Nothing checks a connection
//! with `PING`. (`CLIENT SETINFO`, sent on connecting, may stay refused: the client ignores its
//! reply.) Nothing needs `CONFIG`, `KEYS` or `SCAN`.

/// The ACL rules of a user for the functions, with cache keys under `key_prefix`: e.g.
/// `ACL SETUSER product-cache on >PASSWORD <rules>` on Redis, or an ElastiCache user's access
/// string `on <rules>`.
pub fn rules(key_prefix: &str) -> String {
    format!(
        "resetkeys ~{key_prefix}* ~{{{key_prefix}* ~product-cache:epoch:* resetchannels \
         -@all +get +mget +set +del +rename +evalsha +script|load +wait +cluster|slots +readonly +info|replication +info|stats +time"
    )
}

/// The inspector's rules: the functions' (it reads keys and purges them with their leases)
/// plus `RANDOMKEY`, which draws its sample. A user of its own keeps the functions' user free of
/// a command that walks the keyspace.
pub fn inspector_rules(key_prefix: &str) -> String {
    format!("{} +randomkey", rules(key_prefix))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_rules_cover_every_key_the_functions_write() {
        let rules = super::rules("product:");
        assert_eq!(
            rules,
            "resetkeys ~product:* ~{product:* ~product-cache:epoch:* resetchannels \
             -@all +get +mget +set +del +rename +evalsha +script|load +wait +cluster|slots +readonly +info|replication +info|stats +time"
        );
    }

    #[test]
    fn the_handbook_documents_these_rules() {
        // The functions' line is in "Redis permissions", the inspector's in "The inspector".
        let page = |name: &str| {
            let path = format!("{}/../../docs/{name}", env!("CARGO_MANIFEST_DIR"));
            std::fs::read_to_string(path).unwrap()
        };
        assert!(
            page("deploying.md").contains(&format!("\n{}\n", super::rules("product:"))),
            "docs/deploying.md's ACL line is stale"
        );
        assert!(
            page("operating.md").contains(&super::inspector_rules("product:")),
            "docs/operating.md's inspector ACL line is stale"
        );
    }
}
