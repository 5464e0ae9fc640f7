//! Cron schedules with seconds and year fields, evaluated in UTC or a job's time zone.
