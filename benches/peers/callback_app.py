"""FastAPI + SQLAlchemy peer of the callback-ingestion benchmark: the seed's
backend callback endpoint (and job creation), on the same Postgres.

Run: DATABASE_URL=postgresql+asyncpg://... python callback_app.py   # creates the tables
     DATABASE_URL=... uvicorn callback_app:app --workers 2
"""
import os
import uuid
from datetime import datetime
from typing import Dict, Optional

from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, Uuid
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

engine = create_async_engine(os.environ["DATABASE_URL"], pool_size=16)
Session = async_sessionmaker(engine, expire_on_commit=False)


class Base(DeclarativeBase):
    pass


class TrainingJob(Base):
    __tablename__ = "training_jobs"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[str] = mapped_column(String)
    model_name: Mapped[str] = mapped_column(String)
    framework: Mapped[str] = mapped_column(String)
    dataset_s3_uri: Mapped[str] = mapped_column(String)
    status: Mapped[str] = mapped_column(String, default="pending")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(String, default="")
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=datetime.utcnow)


class TrainingMetric(Base):
    __tablename__ = "training_metrics"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("training_jobs.id"))
    epoch: Mapped[int] = mapped_column(Integer)
    values: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=datetime.utcnow)


class NewJob(BaseModel):
    user_id: str
    model_name: str
    framework: str
    dataset_s3_uri: str


class TrainingReport(BaseModel):
    job_id: Optional[str] = None
    status: str
    progress: float = 0.0
    message: str = ""
    metrics: Optional[Dict[str, float]] = None
    checkpoint_s3_uri: Optional[str] = None
    error: Optional[str] = None
    seq: Optional[int] = None


app = FastAPI()


async def create_tables() -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)


async def db():
    async with Session() as session:
        yield session


@app.post("/training/jobs", status_code=201)
async def create(job: NewJob, session: AsyncSession = Depends(db)):
    row = TrainingJob(**job.model_dump())
    session.add(row)
    await session.commit()
    return {"id": str(row.id), "status": row.status}


@app.post("/training/jobs/{job_id}/callback")
async def callback(job_id: uuid.UUID, update: TrainingReport, session: AsyncSession = Depends(db)):
    job = await session.get(TrainingJob, job_id)
    if not job:
        raise HTTPException(404)
    job.status = update.status
    job.progress = update.progress
    job.message = update.message
    job.updated_at = datetime.utcnow()
    if update.metrics:
        session.add(TrainingMetric(job_id=job_id, epoch=int(update.metrics.get("epoch", 0)), values=update.metrics))
    await session.commit()
    return {"status": "ok"}


if __name__ == "__main__":
    import asyncio

    asyncio.run(create_tables())
