"""The first nightly history schema: nights, results, crashes, figures.

Revision ID: 0001
Revises:
"""
from alembic import op
import sqlalchemy as sa

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _night_fk() -> sa.Column:
    return sa.Column("night_id", sa.Integer, sa.ForeignKey("nights.id", ondelete="CASCADE"), nullable=False,
                     index=True)


def upgrade() -> None:
    op.create_table(
        "nights",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("label", sa.String(200), nullable=False, unique=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("commit", sa.String(64), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("versions", sa.JSON, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
    )
    op.create_table(
        "results",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        _night_fk(),
        sa.Column("test", sa.String(1000), nullable=False, index=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("duration", sa.Float, nullable=False),
        sa.Column("signature", sa.Text, nullable=True),
        sa.Column("message", sa.Text, nullable=True),
        sa.Column("artifacts", sa.Text, nullable=True),
        sa.UniqueConstraint("night_id", "test"),
    )
    op.create_table(
        "crashes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        _night_fk(),
        sa.Column("test", sa.String(1000), nullable=False),
        sa.Column("bucket", sa.String(500), nullable=False, index=True),
        sa.Column("dump", sa.Text, nullable=True),
    )
    op.create_table(
        "figures",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        _night_fk(),
        sa.Column("benchmark", sa.String(200), nullable=False),
        sa.Column("figure", sa.String(300), nullable=False),
        sa.Column("value", sa.Float, nullable=True),
        sa.Column("unit", sa.String(40), nullable=False),
        sa.Column("target", sa.String(200), nullable=True),
        sa.Column("target_op", sa.String(2), nullable=True),
        sa.Column("target_value", sa.Float, nullable=True),
        sa.UniqueConstraint("night_id", "benchmark", "figure"),
    )


def downgrade() -> None:
    for table in ("figures", "crashes", "results", "nights"):
        op.drop_table(table)
