//! Who may use the administrative RPCs (AnalyticsAdminService) without mTLS: nobody
//! unless ADMIN_RPCS_ENABLED=true, and then only with SUPPRESSION_KEY_FILE configured.
//! The mTLS allow-list cases are in `tls`.

use analytics_service::pb;
use tonic::Code;

use crate::helpers::{admin_env, spawn_app_with, TestOptions};

async fn codes_of_every_admin_rpc(app: &crate::helpers::TestApp) -> Vec<Code> {
    let mut admin = app.admin_client();
    let user_id = "u-admin".to_string();
    vec![
        admin
            .delete_user(pb::DeleteUserRequest { user_id: user_id.clone(), suppress: false })
            .await
            .map(|_| ())
            .unwrap_err()
            .code(),
        admin
            .get_user_deletion(pb::GetUserDeletionRequest { request_id: uuid::Uuid::nil().to_string() })
            .await
            .map(|_| ())
            .unwrap_err()
            .code(),
        admin
            .lift_suppression(pb::LiftSuppressionRequest { user_id: user_id.clone() })
            .await
            .map(|_| ())
            .unwrap_err()
            .code(),
        admin.export_user(pb::ExportUserRequest { user_id }).await.map(|_| ()).unwrap_err().code(),
    ]
}

#[tokio::test]
async fn without_mtls_the_admin_rpcs_are_refused_unless_enabled() {
    let (mut env, _key) = admin_env();
    env.retain(|(name, _)| name != "ADMIN_RPCS_ENABLED");
    let app = spawn_app_with(TestOptions { env, ..TestOptions::default() }).await;
    assert_eq!(codes_of_every_admin_rpc(&app).await, [Code::PermissionDenied; 4]);
    let metrics = app.admin_get("/metrics").await.1;
    assert!(metrics.contains("DeleteUser"), "the refusal is counted per rpc");
}

#[tokio::test]
async fn enabled_admin_rpcs_need_the_suppression_key() {
    let env = vec![("ADMIN_RPCS_ENABLED".to_string(), "true".to_string())];
    let app = spawn_app_with(TestOptions { env, ..TestOptions::default() }).await;
    assert_eq!(codes_of_every_admin_rpc(&app).await, [Code::FailedPrecondition; 4]);
}
