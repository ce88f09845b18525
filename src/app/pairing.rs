//! Pairing users: codes, approvals, direct pairs and unpairs.

use super::*;
use crate::domain::pairing;

impl Gateway {
    /// Issues a pairing code for an unknown user (shown to them once).
    pub async fn request_pairing(
        &self,
        user_id: &str,
        display_name: Option<String>,
    ) -> Result<(String, i64), AppError> {
        Scope::new("user", user_id).map_err(bad)?;
        if self
            .view
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .users
            .contains_key(user_id)
        {
            return Err(AppError::Pairing(format!(
                "user {user_id} is already paired"
            )));
        }
        let code = loop {
            let mut bytes = [0u8; 64];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
            if let Some(c) = pairing::code_from_random(&bytes) {
                break c;
            }
        };
        let now = now_ms();
        let expires = now + self.cfg.pairing.code_ttl.0.as_millis() as i64;
        let display_name = display_name.map(|n| self.display_name(&n));
        match self
            .store
            .create_pairing_code(
                user_id.to_string(),
                display_name,
                pairing::hash_code(&code),
                now,
                expires,
                self.cfg.pairing.max_live_codes,
                events::pairing_requested(now, user_id, expires),
            )
            .await?
        {
            Ok(()) => Ok((code, expires)),
            Err(e @ (PairingRefused::AlreadyPaired(_) | PairingRefused::TooManyCodes(_))) => {
                Err(AppError::Pairing(e.to_string()))
            }
        }
    }

    /// Approves a typed code; returns the user now paired.
    pub async fn approve_pairing(&self, code: &str, by: &str) -> Result<PairedUser, AppError> {
        let code = pairing::normalize(code);
        if code.len() != pairing::CODE_LEN {
            return Err(bad(format!(
                "a pairing code has {} characters",
                pairing::CODE_LEN
            )));
        }
        let user = self
            .store
            .redeem_pairing_code(code, by.to_string(), now_ms(), |u| {
                events::pairing_approved(u.paired_ms, &u.paired_by, &u.user_id)
            })
            .await?
            .ok_or_else(|| {
                AppError::Pairing("no live pairing code matches (wrong, used or expired)".into())
            })?;
        self.refresh_policy().await?;
        Ok(user)
    }

    /// Pairs a user directly, with optional roles.
    pub async fn pair_user(
        &self,
        user_id: &str,
        roles: Vec<String>,
        by: &str,
    ) -> Result<bool, AppError> {
        Scope::new("user", user_id).map_err(bad)?;
        for r in &roles {
            Scope::new("role", r).map_err(bad)?;
        }
        let user = PairedUser {
            user_id: user_id.to_string(),
            roles,
            display_name: None,
            paired_by: by.to_string(),
            paired_ms: now_ms(),
        };
        let audit = events::user_paired(user.paired_ms, by, user_id, &user.roles);
        let added = self.store.pair_user(user, audit).await?;
        self.refresh_policy().await?;
        Ok(added)
    }

    pub async fn revoke_pairing(&self, user_id: &str, by: &str) -> Result<bool, AppError> {
        if self.cfg.users.iter().any(|u| u.id == user_id) {
            return Err(bad(format!(
                "user {user_id} is paired by the config file; remove it there"
            )));
        }
        let removed = self
            .store
            .unpair_user(
                user_id.to_string(),
                events::pairing_revoked(now_ms(), by, user_id),
            )
            .await?;
        self.refresh_policy().await?;
        Ok(removed)
    }

    pub async fn pairings(&self) -> Result<(Vec<PairedUser>, Vec<PendingPairing>), AppError> {
        let mut users: Vec<PairedUser> = self
            .cfg
            .users
            .iter()
            .map(|u| PairedUser {
                user_id: u.id.clone(),
                roles: u.roles.clone(),
                display_name: None,
                paired_by: "config".into(),
                paired_ms: 0,
            })
            .collect();
        users.extend(self.store.paired_users().await?);
        Ok((users, self.store.pairing_codes(now_ms()).await?))
    }

    /// The live pairing codes (never the codes themselves).
    pub async fn pairing_codes(&self) -> Result<Vec<PendingPairing>, StoreError> {
        self.store.pairing_codes(now_ms()).await
    }
}
