//! Caller allow-lists. A caller is the identity of its verified client certificate
//! ([`crate::security::caller`]). TLS_ALLOWED_CALLERS applies to every AnalyticsService
//! RPC; TLS_ALLOWED_CALLERS_PER_RPC narrows single RPCs with the syntax
//! `Rpc=id1|id2;Rpc2=id3` (RPC names as in the proto, e.g. `GetEventCount`, checked
//! against the catalogue [`Rpc`]). A call must pass both lists that apply to it; an
//! empty or absent list allows every verified caller.
//!
//! The administrative RPCs (AnalyticsAdminService: erasure and access requests) are
//! closed by default ([`AdminAccess`]): with mTLS a caller needs its own entry for the
//! RPC in TLS_ALLOWED_CALLERS_PER_RPC (no entry = nobody); without mTLS nobody may call
//! them unless ADMIN_RPCS_ENABLED=true.
//!
//! The standard services: server reflection follows TLS_ALLOWED_CALLERS unless
//! TLS_ALLOWED_CALLERS_COVER_REFLECTION is false (it describes the whole API, so it is no
//! more public than the API). grpc.health answers every verified caller: it discloses
//! only serving status, and probes and `analytics-service healthcheck` must work with any
//! certificate the client CA signed.

use std::collections::{HashMap, HashSet};

use crate::models::rpc::Rpc;

/// Who may call the administrative RPCs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum AdminAccess {
    /// Nobody (plaintext without ADMIN_RPCS_ENABLED; the default).
    #[default]
    Nobody,
    /// With mTLS: the callers of each RPC's own TLS_ALLOWED_CALLERS_PER_RPC entry (and
    /// TLS_ALLOWED_CALLERS when set); an RPC without an entry is closed.
    ListedCallers,
    /// Plaintext with ADMIN_RPCS_ENABLED=true: every caller (the network is the guard).
    Everyone,
}

/// Who may call what. Empty lists mean everyone for the AnalyticsService RPCs
/// (plaintext mode or no lists configured); the administrative RPCs follow `admin`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallerPolicy {
    global: HashSet<String>,
    per_rpc: HashMap<Rpc, HashSet<String>>,
    admin: AdminAccess,
}

impl CallerPolicy {
    /// Parses TLS_ALLOWED_CALLERS (comma list) and TLS_ALLOWED_CALLERS_PER_RPC.
    pub(crate) fn parse(global: &str, per_rpc: &str) -> Result<Self, String> {
        let global = global.split(',').map(str::trim).filter(|id| !id.is_empty()).map(String::from).collect();
        let mut rules = HashMap::new();
        for rule in per_rpc.split(';').map(str::trim).filter(|rule| !rule.is_empty()) {
            let Some((rpc, callers)) = rule.split_once('=') else {
                return Err(format!("TLS_ALLOWED_CALLERS_PER_RPC: expected Rpc=id1|id2, got {rule:?}"));
            };
            let name = rpc.trim();
            let Some(rpc) = Rpc::analytics_method(name) else {
                let known: Vec<&str> = Rpc::analytics_methods().map(Rpc::method).collect();
                return Err(format!(
                    "TLS_ALLOWED_CALLERS_PER_RPC: unknown rpc {name:?}, expected one of {}",
                    known.join(", ")
                ));
            };
            let callers: HashSet<String> =
                callers.split('|').map(str::trim).filter(|id| !id.is_empty()).map(String::from).collect();
            if callers.is_empty() {
                return Err(format!("TLS_ALLOWED_CALLERS_PER_RPC: {name} lists no caller"));
            }
            rules.insert(rpc, callers);
        }
        Ok(Self { global, per_rpc: rules, admin: AdminAccess::Nobody })
    }

    /// The same lists with `admin` deciding the administrative RPCs.
    pub(crate) fn with_admin_access(self, admin: AdminAccess) -> Self {
        Self { admin, ..self }
    }

    pub(crate) fn is_open(&self) -> bool {
        self.global.is_empty() && self.per_rpc.is_empty()
    }

    /// Whether `caller` may use server reflection when it follows the global list.
    pub(crate) fn allows_reflection(&self, caller: &str) -> bool {
        self.global.is_empty() || self.global.contains(caller)
    }

    /// Whether `caller` may call `rpc`.
    pub(crate) fn allows(&self, rpc: Rpc, caller: &str) -> bool {
        if rpc.is_admin() {
            return match self.admin {
                AdminAccess::Nobody => false,
                AdminAccess::Everyone => true,
                AdminAccess::ListedCallers => {
                    (self.global.is_empty() || self.global.contains(caller))
                        && self.per_rpc.get(&rpc).is_some_and(|callers| callers.contains(caller))
                }
            };
        }
        let globally = self.global.is_empty() || self.global.contains(caller);
        let for_rpc = self.per_rpc.get(&rpc).is_none_or(|callers| callers.contains(caller));
        globally && for_rpc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_lists_must_allow_the_caller() {
        let policy = CallerPolicy::parse(
            "spiffe://prod/gateway, spiffe://prod/web",
            "GetEventCount=spiffe://prod/gateway;GetUserCount=spiffe://prod/gateway",
        )
        .unwrap();
        assert!(policy.allows(Rpc::GetEventCount, "spiffe://prod/gateway"));
        assert!(!policy.allows(Rpc::GetEventCount, "spiffe://prod/web"));
        assert!(policy.allows(Rpc::TrackEvent, "spiffe://prod/web"));
        assert!(!policy.allows(Rpc::TrackEvent, "spiffe://prod/intruder"));
        assert!(policy.allows_reflection("spiffe://prod/web"));
        assert!(!policy.allows_reflection("spiffe://prod/intruder"));
        assert!(CallerPolicy::parse("", "GetEventCount=a").unwrap().allows_reflection("b"));
    }

    #[test]
    fn empty_lists_allow_everyone() {
        let policy = CallerPolicy::parse("", "").unwrap();
        assert!(policy.is_open());
        assert!(policy.allows(Rpc::GetEventCount, "anyone"));
    }

    #[test]
    fn admin_rpcs_are_closed_unless_allowed_explicitly() {
        let open = CallerPolicy::parse("", "").unwrap();
        assert!(!open.allows(Rpc::DeleteUser, "anyone"), "closed by default");
        assert!(open.clone().with_admin_access(AdminAccess::Everyone).allows(Rpc::ExportUser, "anyone"));
        let listed = CallerPolicy::parse("", "DeleteUser=spiffe://ops/dpo")
            .unwrap()
            .with_admin_access(AdminAccess::ListedCallers);
        assert!(listed.allows(Rpc::DeleteUser, "spiffe://ops/dpo"));
        assert!(!listed.allows(Rpc::DeleteUser, "spiffe://prod/web"));
        assert!(!listed.allows(Rpc::ExportUser, "spiffe://ops/dpo"), "no entry = nobody");
        assert!(listed.allows(Rpc::TrackEvent, "spiffe://prod/web"), "other RPCs stay open");
        let narrowed = CallerPolicy::parse("spiffe://prod/web", "DeleteUser=spiffe://ops/dpo")
            .unwrap()
            .with_admin_access(AdminAccess::ListedCallers);
        assert!(!narrowed.allows(Rpc::DeleteUser, "spiffe://ops/dpo"), "the global list applies too");
    }

    #[test]
    fn bad_rules_name_the_variable() {
        for rule in ["GetEventCount", "NoSuchRpc=a", "GetEventCount=", "Check=a"] {
            let error = CallerPolicy::parse("", rule).unwrap_err();
            assert!(error.contains("TLS_ALLOWED_CALLERS_PER_RPC"), "{rule}: {error}");
        }
        let error = CallerPolicy::parse("", "NoSuchRpc=a").unwrap_err();
        assert!(
            error.ends_with(
                "GetUserCount, HealthCheck, DeleteUser, GetUserDeletion, LiftSuppression, ExportUser"
            ),
            "{error}"
        );
    }
}
