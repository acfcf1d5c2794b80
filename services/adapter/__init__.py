"""RabbitMQ worker: consumes StudyTasks, screens them with Triton, replies with StudyResults."""
