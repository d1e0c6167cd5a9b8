//! SQL of sandbox networking: address allocation, the stored network, group members.

use sandboxd_api::NetworkInfo;
use sqlx::Row;
use uuid::Uuid;

use super::{corrupt_json, Store, StoreError};

impl Store {
    /// Give a `creating` sandbox the lowest host number in `first..=last` that no live sandbox
    /// holds; `None` when all are taken. (One writer connection: allocations cannot race, and
    /// the unique index would refuse a duplicate anyway.)
    pub async fn assign_net_index(
        &self,
        id: Uuid,
        first: u32,
        last: u32,
    ) -> Result<Option<u32>, StoreError> {
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(
            "SELECT s FROM (
                 SELECT ?1 AS s
                 UNION ALL
                 SELECT net_index + 1 FROM sandboxes
                  WHERE net_index IS NOT NULL AND state IN ('creating', 'running')
             )
             WHERE s >= ?1 AND s <= ?2 AND s NOT IN (
                 SELECT net_index FROM sandboxes
                  WHERE net_index IS NOT NULL AND state IN ('creating', 'running'))
             ORDER BY s LIMIT 1",
        )
        .bind(i64::from(first))
        .bind(i64::from(last))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let index: i64 = row.try_get("s")?;
        sqlx::query("UPDATE sandboxes SET net_index = ? WHERE id = ?")
            .bind(index)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(u32::try_from(index).ok())
    }

    /// Record what was set up (shown as the sandbox's `network`).
    pub async fn set_network(&self, id: Uuid, info: &NetworkInfo) -> Result<(), StoreError> {
        let json = serde_json::to_string(info).map_err(corrupt_json(id))?;
        sqlx::query("UPDATE sandboxes SET network = ? WHERE id = ?")
            .bind(json)
            .bind(id.to_string())
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// Host names and addresses of the live members of `group` other than `except`.
    pub async fn group_members(
        &self,
        group: &str,
        except: Uuid,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT hostname, json_extract(network, '$.address') AS address FROM sandboxes
              WHERE state IN ('creating', 'running') AND net_index IS NOT NULL
                AND json_extract(network, '$.group') = ? AND id != ?
              ORDER BY seq",
        )
        .bind(group)
        .bind(except.to_string())
        .fetch_all(&self.writer)
        .await?;
        let mut members = Vec::with_capacity(rows.len());
        for row in rows {
            let address: Option<String> = row.try_get("address")?;
            if let Some(address) = address {
                members.push((row.try_get("hostname")?, address));
            }
        }
        Ok(members)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn addresses_are_lowest_free_and_released_when_a_sandbox_ends() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).await.unwrap();
        let mut ids = Vec::new();
        for _ in 0..3 {
            let new = super::super::tests::new(None);
            store.insert_creating(&new, None).await.unwrap();
            ids.push(new.id);
        }
        assert_eq!(store.assign_net_index(ids[0], 2, 3).await.unwrap(), Some(2));
        assert_eq!(store.assign_net_index(ids[1], 2, 3).await.unwrap(), Some(3));
        assert_eq!(store.assign_net_index(ids[2], 2, 3).await.unwrap(), None);
        // The first ends: its address is free again.
        let end = super::super::Ending {
            state: sandboxd_api::SandboxState::Exited,
            exit_code: Some(0),
            signal: None,
            reason: sandboxd_api::EndReason::Exited,
            error: None,
            finished_at_ms: 5,
            stats: None,
        };
        store.finish(ids[0], &end, 1).await.unwrap();
        assert_eq!(store.assign_net_index(ids[2], 2, 3).await.unwrap(), Some(2));
        let info = NetworkInfo {
            mode: sandboxd_api::NetworkMode::Bridge,
            group: Some("g".into()),
            address: Some("10.88.0.2".into()),
            gateway: Some("10.88.0.1".into()),
            ports: vec![],
            egress: None,
        };
        store.set_network(ids[2], &info).await.unwrap();
        assert_eq!(
            store.group_members("g", ids[1]).await.unwrap(),
            vec![("h".to_string(), "10.88.0.2".to_string())]
        );
        assert!(store.group_members("g", ids[2]).await.unwrap().is_empty());
        assert_eq!(
            store.get(ids[2]).await.unwrap().unwrap().network,
            Some(info)
        );
    }
}
