"""The floor every process stands on: process supervision and deadlines, error types, the QMP session."""
