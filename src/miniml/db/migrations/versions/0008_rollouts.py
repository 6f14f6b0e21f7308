"""why a deployment's last rollout failed, the reason on history events, and ended jobs whose
MLflow runs are still to be ended

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deployment", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rollout_error", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("rollout_version", sa.String(32), nullable=True))
        batch_op.add_column(sa.Column("allow_schema_change", sa.Boolean(), server_default=sa.false(), nullable=False))
    with op.batch_alter_table("deployment_event", schema=None) as batch_op:
        batch_op.add_column(sa.Column("detail", sa.Text(), nullable=True))
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("runs_open", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_column("runs_open")
    with op.batch_alter_table("deployment_event", schema=None) as batch_op:
        batch_op.drop_column("detail")
    with op.batch_alter_table("deployment", schema=None) as batch_op:
        batch_op.drop_column("allow_schema_change")
        batch_op.drop_column("rollout_version")
        batch_op.drop_column("rollout_error")
