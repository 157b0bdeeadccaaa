"""Stand-in for ``comfy.model_management``: the interrupt check."""


class InterruptProcessingException(Exception):
    pass


interrupt_processing = False


def interrupt_current_processing(value=True):
    global interrupt_processing
    interrupt_processing = value


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    if interrupt_processing:
        interrupt_processing = False
        raise InterruptProcessingException()
