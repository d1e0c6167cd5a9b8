//! SQL of egress: the policy in force per sandbox, its recent denials (bounded) and the last
//! counters the filter reported. All of it goes with the sandbox's row (`ON DELETE CASCADE`).

use std::net::Ipv4Addr;

use sandboxd_api::egress::{DenialReason, EgressCounters, EgressDenial, EgressPolicy};
use sqlx::Row;
use uuid::Uuid;

use super::{corrupt_json, parse_uuid, time_of, Store, StoreError};

/// Denials kept per sandbox; older ones are pruned as new ones come.
pub const MAX_DENIALS: i64 = 1000;

/// A live bridged sandbox with a policy, as the filter is told of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LivePolicy {
    pub sandbox: Uuid,
    pub address: Ipv4Addr,
    pub policy: EgressPolicy,
}

impl Store {
    /// Set (or replace) the policy of a sandbox; false when there is no such sandbox.
    pub async fn set_egress_policy(
        &self,
        id: Uuid,
        policy: &EgressPolicy,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let json = serde_json::to_string(policy).map_err(corrupt_json(id))?;
        let done = sqlx::query(
            "INSERT INTO egress_policies (sandbox_id, policy, updated_at)
             SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM sandboxes WHERE id = ?1)
             ON CONFLICT (sandbox_id) DO UPDATE SET policy = ?2, updated_at = ?3",
        )
        .bind(id.to_string())
        .bind(json)
        .bind(now_ms)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The tenant a sandbox belongs to.
    pub async fn sandbox_tenant(&self, id: Uuid) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT tenant FROM sandboxes WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await?;
        Ok(match row {
            Some(r) => Some(r.try_get(0)?),
            None => None,
        })
    }

    /// The policy of a sandbox, if it has one.
    pub async fn egress_policy(&self, id: Uuid) -> Result<Option<EgressPolicy>, StoreError> {
        let row = sqlx::query("SELECT policy FROM egress_policies WHERE sandbox_id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await?;
        match row {
            Some(r) => {
                let json: String = r.try_get(0)?;
                Ok(Some(serde_json::from_str(&json).map_err(corrupt_json(id))?))
            }
            None => Ok(None),
        }
    }

    /// Every `creating` or `running` sandbox with an address and a policy: what the filter
    /// must hold.
    pub async fn live_egress_policies(&self) -> Result<Vec<LivePolicy>, StoreError> {
        let rows = sqlx::query(
            "SELECT s.id, json_extract(s.network, '$.address') AS address, p.policy
               FROM sandboxes s JOIN egress_policies p ON p.sandbox_id = s.id
              WHERE s.state IN ('creating', 'running') AND s.net_index IS NOT NULL
              ORDER BY s.seq",
        )
        .fetch_all(&self.writer)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let id = parse_uuid(&row.try_get::<String, _>(0)?)?;
            // A row still being set up may not have its address recorded yet; its own `Set`
            // follows once it has.
            let Some(address) = row.try_get::<Option<String>, _>(1)? else {
                continue;
            };
            let address = address.parse().map_err(|_| StoreError::Corrupt {
                id: id.to_string(),
                what: "network address".into(),
            })?;
            let policy: String = row.try_get(2)?;
            out.push(LivePolicy {
                sandbox: id,
                address,
                policy: serde_json::from_str(&policy).map_err(corrupt_json(id))?,
            });
        }
        Ok(out)
    }

    /// Record a denial (ignored when the sandbox is gone) and prune the sandbox's oldest ones
    /// beyond [`MAX_DENIALS`].
    pub async fn add_egress_denial(&self, id: Uuid, d: &EgressDenial) -> Result<(), StoreError> {
        let at_ms = i64::try_from(d.at.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        let reason = serde_json::to_value(d.reason).map_err(corrupt_json(id))?;
        let mut tx = self.writer.begin().await?;
        sqlx::query(
            "INSERT INTO egress_denials (sandbox_id, at, protocol, address, port, name, reason)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7 WHERE EXISTS (SELECT 1 FROM sandboxes WHERE id = ?1)",
        )
        .bind(id.to_string())
        .bind(at_ms)
        .bind(&d.protocol)
        .bind(d.address.map(|a| a.to_string()))
        .bind(d.port.map(i64::from))
        .bind(d.name.as_deref())
        .bind(reason.as_str().unwrap_or("not_allowed"))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM egress_denials WHERE sandbox_id = ?1 AND seq <= (
                 SELECT seq FROM egress_denials WHERE sandbox_id = ?1
                  ORDER BY seq DESC LIMIT 1 OFFSET ?2)",
        )
        .bind(id.to_string())
        .bind(MAX_DENIALS)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The `limit` most recent denials of a sandbox, newest first.
    pub async fn egress_denials(
        &self,
        id: Uuid,
        limit: u32,
    ) -> Result<Vec<EgressDenial>, StoreError> {
        let rows = sqlx::query(
            "SELECT at, protocol, address, port, name, reason FROM egress_denials
              WHERE sandbox_id = ? ORDER BY seq DESC LIMIT ?",
        )
        .bind(id.to_string())
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        let bad = |what: &str| StoreError::Corrupt {
            id: id.to_string(),
            what: what.to_owned(),
        };
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let reason: String = row.try_get(5)?;
            let reason: DenialReason = serde_json::from_value(serde_json::Value::String(reason))
                .map_err(|_| bad("denial reason"))?;
            let address = match row.try_get::<Option<String>, _>(2)? {
                Some(a) => Some(a.parse().map_err(|_| bad("denial address"))?),
                None => None,
            };
            let port = match row.try_get::<Option<i64>, _>(3)? {
                Some(p) => Some(u16::try_from(p).map_err(|_| bad("denial port"))?),
                None => None,
            };
            out.push(EgressDenial {
                at: time_of(row.try_get(0)?),
                protocol: row.try_get(1)?,
                address,
                port,
                name: row.try_get(4)?,
                reason,
            });
        }
        Ok(out)
    }

    /// Keep the latest totals the filter reported (ignored when the sandbox is gone).
    pub async fn set_egress_counters(
        &self,
        id: Uuid,
        c: &EgressCounters,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        sqlx::query(
            "INSERT INTO egress_counters (sandbox_id, connections_allowed, connections_denied,
                                          bytes_out, bytes_in, updated_at)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6 WHERE EXISTS (SELECT 1 FROM sandboxes WHERE id = ?1)
             ON CONFLICT (sandbox_id) DO UPDATE SET connections_allowed = ?2,
                 connections_denied = ?3, bytes_out = ?4, bytes_in = ?5, updated_at = ?6",
        )
        .bind(id.to_string())
        .bind(n(c.connections_allowed))
        .bind(n(c.connections_denied))
        .bind(n(c.bytes_out))
        .bind(n(c.bytes_in))
        .bind(now_ms)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// The last totals of a sandbox, if the filter reported any.
    pub async fn egress_counters(&self, id: Uuid) -> Result<Option<EgressCounters>, StoreError> {
        let row = sqlx::query(
            "SELECT connections_allowed, connections_denied, bytes_out, bytes_in
               FROM egress_counters WHERE sandbox_id = ?",
        )
        .bind(id.to_string())
        .fetch_optional(&self.reader)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let u = |i: usize| -> Result<u64, StoreError> {
            Ok(u64::try_from(row.try_get::<i64, _>(i)?).unwrap_or(0))
        };
        Ok(Some(EgressCounters {
            connections_allowed: u(0)?,
            connections_denied: u(1)?,
            bytes_out: u(2)?,
            bytes_in: u(3)?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denial(port: u16) -> EgressDenial {
        EgressDenial {
            at: time::OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
            protocol: "tcp".into(),
            address: Some(Ipv4Addr::new(203, 0, 113, 20)),
            port: Some(port),
            name: Some("evil.example".into()),
            reason: DenialReason::NameMismatch,
        }
    }

    #[tokio::test]
    async fn policies_denials_and_counters_live_and_die_with_the_sandbox() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).await.unwrap();
        let new = super::super::tests::new(None);
        let id = new.id;
        store.insert_creating(&new, None).await.unwrap();
        let policy: EgressPolicy =
            serde_json::from_str(r#"{"allow":["pypi.org"],"deny":["203.0.113.9"]}"#).unwrap();
        assert!(store.set_egress_policy(id, &policy, 5).await.unwrap());
        assert!(!store
            .set_egress_policy(Uuid::new_v4(), &policy, 5)
            .await
            .unwrap());
        assert_eq!(store.egress_policy(id).await.unwrap(), Some(policy.clone()));
        // No address yet: not pushed.
        assert!(store.live_egress_policies().await.unwrap().is_empty());
        assert_eq!(store.assign_net_index(id, 2, 9).await.unwrap(), Some(2));
        let info = sandboxd_api::NetworkInfo {
            mode: sandboxd_api::NetworkMode::Bridge,
            address: Some("10.88.0.2".into()),
            gateway: Some("10.88.0.1".into()),
            ..Default::default()
        };
        store.set_network(id, &info).await.unwrap();
        assert_eq!(
            store.live_egress_policies().await.unwrap(),
            vec![LivePolicy {
                sandbox: id,
                address: Ipv4Addr::new(10, 88, 0, 2),
                policy: policy.clone()
            }]
        );
        // The sandbox object shows the policy in force.
        let shown = store.get(id).await.unwrap().unwrap().network.unwrap();
        assert_eq!(shown.egress, Some(policy.clone()));

        for port in 1..=(MAX_DENIALS as u16 + 5) {
            store.add_egress_denial(id, &denial(port)).await.unwrap();
        }
        let all = store.egress_denials(id, 5000).await.unwrap();
        assert_eq!(all.len(), MAX_DENIALS as usize);
        assert_eq!(all[0], denial(MAX_DENIALS as u16 + 5));
        assert_eq!(all.last().unwrap().port, Some(6));
        assert_eq!(store.egress_denials(id, 2).await.unwrap().len(), 2);
        // Events about a sandbox that is gone are dropped quietly.
        store
            .add_egress_denial(Uuid::new_v4(), &denial(1))
            .await
            .unwrap();

        let c = EgressCounters {
            connections_allowed: 3,
            connections_denied: 2,
            bytes_out: 100,
            bytes_in: 2000,
        };
        store.set_egress_counters(id, &c, 7).await.unwrap();
        let c2 = EgressCounters {
            connections_allowed: 4,
            ..c
        };
        store.set_egress_counters(id, &c2, 8).await.unwrap();
        assert_eq!(store.egress_counters(id).await.unwrap(), Some(c2));
        store
            .set_egress_counters(Uuid::new_v4(), &c, 7)
            .await
            .unwrap();

        // A restart keeps everything.
        drop(store);
        let store = Store::open(&dir.path().join("db")).await.unwrap();
        assert_eq!(store.egress_policy(id).await.unwrap(), Some(policy));
        assert_eq!(store.egress_counters(id).await.unwrap(), Some(c2));
        // Deleting the sandbox deletes all of it.
        assert!(store.delete(id).await.unwrap());
        assert_eq!(store.egress_policy(id).await.unwrap(), None);
        assert_eq!(store.egress_counters(id).await.unwrap(), None);
        assert!(store.egress_denials(id, 10).await.unwrap().is_empty());
    }
}
